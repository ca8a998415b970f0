"""JSON Schema files for editors (``schemas/*.json``), generated from the models."""

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


def generate(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
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
