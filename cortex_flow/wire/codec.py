"""Message codecs: how an entry's fields become ``msg`` and back.

``raw``: ``msg`` is the entry's fields (strings). ``json``: the entry holds one
field ``data`` with a JSON object, and ``msg`` is that object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class DecodeError(ValueError):
    """The entry cannot be turned into a message; it is dead-lettered at once."""


def decode(codec: str, fields: dict[str, str]) -> Any:
    if codec == "raw":
        # a copy: a handler that changes its message must not change what a retry or
        # the dead-letter stream sees as the original fields
        return dict(fields)
    data = fields.get("data")
    if data is None:
        raise DecodeError(f"json codec: the entry has no `data` field (fields: {sorted(fields)})")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # nested too deep: hostile input
        raise DecodeError(f"json codec: `data` is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DecodeError(f"json codec: `data` must hold a JSON object, got {type(value).__name__}")
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def encode(codec: str, msg: Mapping[str, Any]) -> dict[str, str]:
    """Fields for XADD; raw turns non-string values into JSON text."""
    if codec == "raw":
        if all(isinstance(v, str) for v in msg.values()):
            return dict(msg)
        return {str(k): _text(v) for k, v in msg.items()}
    return {"data": json.dumps(dict(msg), separators=(",", ":"), default=str)}
