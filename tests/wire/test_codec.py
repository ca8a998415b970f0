"""The json codec turns hostile input into a DecodeError (a dead letter), never a crash."""

from __future__ import annotations

import pytest

from cortex_flow.wire.codec import (
    ERRORS,
    DecodeError,
    decode,
    is_utf8,
    original_bytes,
    printable,
)


def test_json_nested_too_deep_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="nested too deep"):
        decode("json", {"data": "[" * 100_000 + "]" * 100_000})


def test_json_object_decodes() -> None:
    assert decode("json", {"data": '{"n": 1}'}) == {"n": 1}


def _read(raw: bytes) -> str:
    """``raw`` as a client reads it (the counted surrogateescape of every client)."""
    return raw.decode("utf-8", ERRORS)


def test_a_field_that_is_not_utf8_is_a_decode_error_naming_it() -> None:
    """The field, whether name or value, and the first byte that is not UTF-8 are named."""
    with pytest.raises(DecodeError) as value:
        decode("raw", {"n": "1", "text": _read(b"ok\xc3\xa9\xff")})
    assert str(value.value) == "field `text`: its value is not UTF-8 (byte 0xff at offset 4)"
    with pytest.raises(DecodeError) as name:
        decode("json", {_read(b"d\xfe"): "1", "data": "{}"})
    assert str(name.value) == "field `d\\xfe`: its name is not UTF-8 (byte 0xfe at offset 1)"


def test_text_that_is_not_utf8_is_shown_escaped_and_written_back_as_read() -> None:
    """printable shows \\xNN; original_bytes (and the clients' encoder) give the bytes back."""
    text = _read(b"caf\xc3\xa9 \xff")
    assert printable(text) == "café \\xff"
    assert original_bytes(text) == b"caf\xc3\xa9 \xff"
    assert text.encode("utf-8", ERRORS) == b"caf\xc3\xa9 \xff"
    assert not is_utf8(text) and is_utf8("café")
    assert decode("raw", {"text": "café"}) == {"text": "café"}
