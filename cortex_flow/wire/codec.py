"""Message codecs: how an entry's fields become ``msg`` and back.

``raw``: ``msg`` is the entry's fields (strings). ``json``: the entry holds one
field ``data`` with a JSON object, and ``msg`` is that object.

Clients decode replies with :data:`ERRORS` (:mod:`cortex_flow.wire.connection`), which
is ``surrogateescape`` that also counts its use: a field that is not UTF-8 arrives as a
str holding lone surrogates (U+DC80-U+DCFF, one per byte that is not UTF-8), never as
an error in the middle of a read. :func:`decode` refuses such an entry with a
:class:`DecodeError` naming the field, so that entry alone is dead-lettered; written
back through the same client, its fields are the very bytes that were read. Until a
process has met a byte that is not UTF-8, no entry can hold one and the check costs
nothing.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping
from typing import Any

# The error handler clients decode and encode with: ``surrogateescape``, counted.
ERRORS = "cortex-flow-surrogateescape"
_surrogateescape = codecs.lookup_error("surrogateescape")
_escapes = 0  # times bytes that are not UTF-8 were met (read or written) in this process


def _escape(exc: UnicodeError) -> tuple[str | bytes, int]:
    global _escapes
    _escapes += 1
    return _surrogateescape(exc)


codecs.register_error(ERRORS, _escape)


class DecodeError(ValueError):
    """The entry cannot be turned into a message; it is dead-lettered at once."""


def original_bytes(text: str) -> bytes:
    """The bytes a field read as ``text`` holds in Redis."""
    return text.encode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """``text`` with each byte that is not UTF-8 shown as ``\\xNN`` (for people)."""
    if text.isascii():
        return text
    return original_bytes(text).decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    """Whether ``text`` (read with surrogateescape) was valid UTF-8 in Redis."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _not_utf8(kind: str, name: str, text: str) -> DecodeError | None:
    """A DecodeError if ``text`` (field ``name``'s name or value) holds bytes not UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        where = len(text[: exc.start].encode("utf-8", "surrogateescape"))
        byte = ord(text[exc.start]) - 0xDC00
        return DecodeError(
            f"field `{printable(name)}`: its {kind} is not UTF-8 (byte 0x{byte:02x} at "
            f"offset {where})"
        )
    return None


def check_text(fields: Mapping[str, str]) -> None:
    """Raise :class:`DecodeError` naming the first field whose name or value is not UTF-8.

    Free until this process met such a byte (:data:`ERRORS` counts them); then
    ``str.isascii()``, a flag CPython keeps on every string, passes ASCII fields at
    once, and others are encoded once to find a byte that is not UTF-8.
    """
    if not _escapes:
        return
    for name, value in fields.items():
        if name.isascii() and value.isascii():
            continue
        error = _not_utf8("name", name, name) or _not_utf8("value", name, value)
        if error is not None:
            raise error


def decode(codec: str, fields: dict[str, str]) -> Any:
    """``msg`` for an entry's ``fields``; :class:`DecodeError` when it cannot be one.

    Any failure of decoding (``RecursionError`` and ``MemoryError`` included: hostile
    input) is a DecodeError with the cause, so it dead-letters that entry alone.
    """
    check_text(fields)
    if codec == "raw":
        # a copy: a handler that changes its message must not change what a retry or
        # the dead-letter stream sees as the original fields
        return dict(fields)
    data = fields.get("data")
    if data is None:
        names = ", ".join(sorted(printable(n) for n in fields))
        raise DecodeError(f"json codec: the entry has no `data` field (fields: {names})")
    try:
        value = json.loads(data)
    except RecursionError:
        raise DecodeError("json codec: `data` is nested too deep") from None
    except MemoryError:
        raise DecodeError(f"json codec: `data` ({len(data)} characters) is too big") from None
    except ValueError as exc:
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
