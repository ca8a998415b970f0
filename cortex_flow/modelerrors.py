"""Turn pydantic's validation errors into :class:`Problem` lines a person can act on."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from cortex_flow.errors import Problem

Path = tuple[str | int, ...]


class Locator(Protocol):
    file: str

    def locate(self, path: Sequence[str | int]) -> tuple[int, int]: ...

    def key_position(self, path: Sequence[str | int]) -> tuple[int, int]: ...


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``; did you mean "x"?`` when a close choice exists, else the empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types an annotation may hold (Optional/Union/Annotated peeled)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _unwrap(a)]
    return [annotation]


def _descend(model: Any, step: str | int) -> Any:
    """The type found one step below ``model`` along a data path, or None."""
    for candidate in _unwrap(model):
        origin = typing.get_origin(candidate)
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            for name, field in candidate.model_fields.items():
                if step in (name, field.alias):
                    return field.annotation
        elif origin is dict and isinstance(step, str):
            return typing.get_args(candidate)[1]
        elif origin is list and isinstance(step, int):
            return typing.get_args(candidate)[0]
    return None


def allowed_keys(model: type[BaseModel], path: Path) -> list[str]:
    """The keys a mapping at ``path`` may hold, for did-you-mean suggestions."""
    current: Any = model
    for step in path:
        current = _descend(current, step)
        if current is None:
            return []
    for candidate in _unwrap(current):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return [f.alias or n for n, f in candidate.model_fields.items()]
    return []


def _data_path(data: Any, loc: Sequence[str | int], keep_last: bool) -> Path:
    """Keep the parts of pydantic's ``loc`` that are real steps into the data.

    pydantic inserts validator and union tags (``function-after[...]``) into
    ``loc``; they are not keys of the user's file.
    """
    path: list[str | int] = []
    current = data
    for index, step in enumerate(loc):
        last = index == len(loc) - 1
        if (isinstance(current, dict) and isinstance(step, str) and step in current) or (
            isinstance(current, list) and isinstance(step, int) and 0 <= step < len(current)
        ):
            current = current[step]
            path.append(step)
        elif last and keep_last:
            path.append(step)
    return tuple(path)


def dotted(path: Path) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def _message(error: Any, model: type[BaseModel], path: Path) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = error.get("input")
    if kind == "extra_forbidden":
        key = str(path[-1])
        allowed = allowed_keys(model, path[:-1])
        hint = did_you_mean(key, allowed)
        if not hint and allowed:
            hint = "; allowed keys are " + ", ".join(sorted(allowed))
        return f'unknown key "{key}"{hint}'
    if kind == "missing":
        return "is required but missing"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', '')}, got {got!r}".replace("' or '", "' or '")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {
            "greater_than_equal": ("at least", "ge"),
            "greater_than": ("more than", "gt"),
            "less_than_equal": ("at most", "le"),
            "less_than": ("less than", "lt"),
        }[kind]
        limit = next(iter(ctx.values()), "?")
        return f"must be {words[0]} {limit}, got {got!r}"
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        if "A-Za-z][A-Za-z0-9_.-]" in pattern:
            return (
                f"{got!r} is not a valid name; use letters, digits, _ . and -, "
                "starting with a letter"
            )
        if ":" in pattern and "A-Za-z_" in pattern:
            return f"{got!r} is not a callable reference; write module.path:function"
        return f"{got!r} does not match the pattern {pattern}"
    if kind in ("too_short", "too_long"):
        if isinstance(got, list | dict) and ctx.get("min_length") == 1:
            return "must not be empty"
        return str(error["msg"]).lower()
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expect = {
            "int": "a whole number",
            "string": "a string",
            "bool": "true or false",
            "dict": "a mapping",
            "list": "a list",
            "float": "a number",
            "model": "a mapping",
        }
        for word, text in expect.items():
            if kind.startswith(word):
                return f"must be {text}, got {got!r}"
    text = str(error["msg"])
    text = text.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return text[:1].lower() + text[1:]


def problems_from(
    exc: ValidationError, model: type[BaseModel], doc: Locator, data: Any, prefix: Path = ()
) -> list[Problem]:
    """Map every error of ``exc`` to the file position of the offending node."""
    problems = []
    for error in exc.errors(include_url=False):
        kind = error["type"]
        path = _data_path(data, error["loc"], keep_last=kind in ("missing", "extra_forbidden"))
        full = prefix + path
        if kind == "extra_forbidden":
            line, col = doc.key_position(full)
        else:
            line, col = doc.locate(full)
        problems.append(Problem(doc.file, line, col, dotted(path), _message(error, model, path)))
    return problems
