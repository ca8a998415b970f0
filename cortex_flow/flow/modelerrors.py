"""Turn pydantic's validation errors into :class:`Problem` lines a person can act on."""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from cortex_flow.errors import Problem

Path = tuple[str | int, ...]
FIELD_RULE = "field_rule"  # a model-level rule reported at one field: ctx {"field": name}


class Locator(Protocol):
    @property
    def file(self) -> str: ...

    def locate(self, path: Sequence[str | int]) -> tuple[int, int]: ...

    def key_position(self, path: Sequence[str | int]) -> tuple[int, int]: ...


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``; did you mean "x"?`` when a close choice exists, else the empty string."""
    import difflib  # only on the error path

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


def _child(node: Any, step: str | int) -> tuple[bool, Any]:
    if isinstance(node, dict) and isinstance(step, str) and step in node:
        return True, node[step]
    if isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
        return True, node[step]
    return False, None


def _data_path(data: Any, loc: Sequence[str | int], keep_last: bool) -> tuple[Path, bool]:
    """Keep the parts of pydantic's ``loc`` that are real steps into the data.

    pydantic inserts validator and union tags (``function-after[...]``) into
    ``loc``; they are not keys of the user's file. The flag says whether the
    error is about a mapping key itself (``[key]``) rather than its value.
    """
    path: list[str | int] = []
    current = data
    for index, step in enumerate(loc):
        last = index == len(loc) - 1
        if step == "[key]":
            return tuple(path), True
        found, child = _child(current, step)
        if found:
            current = child
            path.append(step)
        elif last and keep_last:
            path.append(step)
    return tuple(path), False


def dotted(path: Path) -> str:
    """``("groups", "a", "routes", 0)`` as ``groups.a.routes[0]``."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def show(value: Any) -> str:
    """A value as the user wrote it in YAML: strings quoted, true/false/null, lists in [ ]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


_TYPES = {
    "int": "a whole number",
    "string": "a string",
    "bool": "true or false",
    "dict": "a mapping",
    "list": "a list",
    "float": "a number",
    "model": "a mapping",
}
_BOUNDS = {
    "greater_than_equal": "at least",
    "greater_than": "more than",
    "less_than_equal": "at most",
    "less_than": "less than",
}


def _literal(expected: str) -> str:
    """pydantic's ``'a' or 'b'`` / ``True`` as YAML words: ``earliest or latest``, ``true``."""
    words = [w.strip().strip("'") for w in expected.replace(" or ", ",").split(",") if w.strip()]
    words = [show(w == "True") if w in ("True", "False") else w for w in words]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else "".join(words)


def _pattern(got: Any, pattern: str, is_key: bool) -> str:
    if "A-Za-z][A-Za-z0-9_.-]" in pattern:
        what = "name" if is_key else "name (or reference to one)"
        return (
            f"{show(got)} is not a valid {what}; use letters, digits, _ . and -, "
            "starting with a letter"
        )
    if "A-Za-z0-9][A-Za-z0-9_.:-]" in pattern:
        return (
            f"{show(got)} is not a valid runner name; use letters, digits, _ . : and -, "
            "starting with a letter or digit"
        )
    if ":" in pattern and "A-Za-z_" in pattern:
        return (
            f"{show(got)} is not a callable reference; write module.path:function, "
            "e.g. agents.worker:handle"
        )
    if pattern.startswith("^https?"):
        return f"{show(got)} is not an http:// or https:// URL"
    return f"{show(got)} does not match the pattern {pattern}"


def _message(error: Any, model: type[BaseModel], path: Path, is_key: bool) -> str:
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
        return f'missing required key "{path[-1]}"' if path else "missing required key"
    if kind == "literal_error":
        return f"must be {_literal(str(ctx.get('expected', '')))}, got {show(got)}"
    if kind in _BOUNDS:
        limit = next(iter(ctx.values()), "?")
        return f"must be {_BOUNDS[kind]} {limit}, got {show(got)}"
    if kind == "string_pattern_mismatch":
        return _pattern(got, str(ctx.get("pattern", "")), is_key)
    if kind in ("too_short", "too_long"):
        if isinstance(got, list | dict) and ctx.get("min_length") == 1:
            return "must not be empty"
        if kind == "too_long" and isinstance(got, str):
            return f"{show(got)} is too long; use at most {ctx.get('max_length')} characters"
        return str(error["msg"]).lower()
    if kind.endswith("_type") or kind.endswith("_parsing"):
        for word, text in _TYPES.items():
            if kind.startswith(word):
                return f"must be {text}, got {show(got)}"
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
        keep = kind in ("missing", "extra_forbidden")
        path, is_key = _data_path(data, error["loc"], keep_last=keep)
        if kind == FIELD_RULE:
            path = (*path, str((error.get("ctx") or {}).get("field", "")))
        full = prefix + path
        if kind in ("extra_forbidden", FIELD_RULE) or is_key:
            line, col = doc.key_position(full)
        elif kind == "missing":
            line, col = doc.locate(full[:-1])
        else:
            line, col = doc.locate(full)
        message = _message(error, model, path, is_key)
        problems.append(Problem(doc.file, line, col, dotted(path), message))
    return problems
