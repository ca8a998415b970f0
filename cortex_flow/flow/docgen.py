"""Generate ``docs/reference.md`` from the models, so the reference never drifts.

Run ``python -m cortex_flow.flow.docgen`` (``--check`` fails when the file is stale).
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cortex_flow.flow.config import Config
from cortex_flow.flow.durations import format_duration
from cortex_flow.flow.models import FlowFile

HEADER = """# Reference

Generated from the models by `python -m cortex_flow.flow.docgen`; do not edit by hand.
Durations are strings such as `250ms`, `30s`, `5m`, `1h`. Unknown keys are errors.
`${VAR}` and `${VAR:-default}` are replaced from the environment in every file.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        meta = args[1:]
        if any(getattr(m, "func", None) and "duration" in str(m.func) for m in meta):
            return "duration"
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo, type_name: str) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(defaults below)"
        return f"`{value}`" if value not in ({}, []) else "empty"
    value = field.default
    if value is None or value is PydanticUndefined:
        return "none"
    if type_name.startswith("duration") and isinstance(value, int | float):
        return f"`{format_duration(float(value))}`"
    return f"`{value}`"


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []

    def walk(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation in seen:
                return
            seen.append(annotation)
            for field in annotation.model_fields.values():
                walk(field.annotation)
        for arg in typing.get_args(annotation):
            walk(arg)

    walk(root)
    return seen


def _section(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    lines = [
        f"### {model.__name__}",
        "",
        doc,
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in model.model_fields.items():
        type_name = _type_name(field.annotation)
        if field.metadata and any("duration" in str(m) for m in field.metadata):
            type_name = "duration"
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| `{field.alias or name}` | {type_name} | {_default(field, type_name)} | {desc} |"
        )
    return "\n".join(lines) + "\n"


def render() -> str:
    parts = [HEADER, "## Flow files (`flows/*.yaml`)\n"]
    parts += [_section(m) for m in _models(FlowFile)]
    parts.append("## Runner settings (`config.yaml`)\n")
    parts += [_section(m) for m in _models(Config)]
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    path = Path("docs/reference.md")
    text = render()
    if "--check" in argv:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            print(
                f"{path} is out of date; run `python -m cortex_flow.flow.docgen`", file=sys.stderr
            )
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
