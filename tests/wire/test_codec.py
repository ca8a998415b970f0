"""The json codec turns hostile input into a DecodeError (a dead letter), never a crash."""

from __future__ import annotations

import pytest

from cortex_flow.wire.codec import DecodeError, decode


def test_json_nested_too_deep_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="nested too deep"):
        decode("json", {"data": "[" * 100_000 + "]" * 100_000})


def test_json_object_decodes() -> None:
    assert decode("json", {"data": '{"n": 1}'}) == {"n": 1}
