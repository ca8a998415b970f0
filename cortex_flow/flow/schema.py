"""JSON Schema files for editors (``schemas/*.json``), generated from the models.

``${VAR}`` and ``${VAR:-default}`` are interpolated in the text of every file before it is
parsed (:mod:`cortex_flow.flow.envvars`), so any scalar may be written as one: every field
whose schema would refuse such a string (numbers, booleans, durations, names, enums,
URLs) also accepts a string holding a reference (``#/$defs/EnvReference``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cortex_flow.flow.config import Config
from cortex_flow.flow.models import FlowFile
from cortex_flow.flow.testfile import FlowTestFile

SCHEMAS: dict[str, type[BaseModel]] = {
    "flow.schema.json": FlowFile,
    "config.schema.json": Config,
    "flowtest.schema.json": FlowTestFile,  # *.test.yaml (cortex-flow test)
}


ENV_REFERENCE: dict[str, Any] = {
    "type": "string",
    "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
    "description": "An environment variable reference, ${VAR} or ${VAR:-default}, "
    "replaced before the file is read.",
}
_ENV_REF = {"$ref": "#/$defs/EnvReference"}
_META = ("title", "description", "default", "examples")
_STRING_RULES = ("pattern", "enum", "const", "minLength", "maxLength", "format")


def _closed(node: dict[str, Any]) -> bool:
    """True for a scalar schema that a string holding ``${VAR}`` would not satisfy."""
    kind = node.get("type")
    if kind in ("integer", "number", "boolean") or "enum" in node or "const" in node:
        return True
    return kind == "string" and any(rule in node for rule in _STRING_RULES)


def _allow_env(node: dict[str, Any], member: bool = False) -> dict[str, Any]:
    """``node`` (a schema) with every closed scalar also accepting an env reference."""
    out = dict(node)
    for key in ("properties", "patternProperties", "$defs"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _allow_env(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _allow_env(out[key])
    if isinstance(out.get("anyOf"), list):
        members = [_allow_env(sub, member=True) for sub in out["anyOf"]]
        out["anyOf"] = members + ([_ENV_REF] if any(map(_closed, members)) else [])
    elif _closed(out) and not member:
        meta = {key: out.pop(key) for key in _META if key in out}
        return {**meta, "anyOf": [out, _ENV_REF]}
    return out


def generate(model: type[BaseModel]) -> dict[str, Any]:
    schema = _allow_env(model.model_json_schema(by_alias=True, mode="validation"))
    schema.setdefault("$defs", {})["EnvReference"] = ENV_REFERENCE
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def render(model: type[BaseModel]) -> str:
    return json.dumps(generate(model), indent=2, sort_keys=True) + "\n"


def write(directory: Path) -> list[Path]:
    """Write every schema file; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in SCHEMAS.items():
        path = directory / name
        path.write_text(render(model), encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """Names of schema files that are missing or differ from the models."""
    out = []
    for name, model in SCHEMAS.items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != render(model):
            out.append(name)
    return out
