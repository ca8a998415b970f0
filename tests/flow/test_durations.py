"""Durations: ``250ms``, ``30s``, ``5m``, ``1h`` and combinations, to seconds and back."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from cortex_flow.flow.durations import Duration, PositiveDuration, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        (" 2s ", 2.0),
        ("1s500ms", 1.5),
    ],
)
def test_parse(text: str, seconds: float) -> None:
    """Each unit, fractions and combinations parse to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (30.0, "30s"),
        (90.0, "1m30s"),
        (3600.0, "1h"),
        (3661.5, "1h1m1s500ms"),
        (0.0, "0s"),
        (0.0004, "0s"),
    ],
)
def test_format(seconds: float, text: str) -> None:
    """Seconds format to the shortest exact text, to the millisecond."""
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["250ms", "30s", "5m", "1h", "1m30s", "2h5m3s7ms", "0s"])
def test_round_trip_of_canonical_text(text: str) -> None:
    """Canonical text survives parse then format unchanged."""
    assert format_duration(parse_duration(text)) == text


@pytest.mark.parametrize("seconds", [0.001, 0.5, 1.0, 59.999, 60.0, 86400.0, 12345.678])
def test_round_trip_of_seconds(seconds: float) -> None:
    """Seconds survive format then parse, to the millisecond."""
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=0.0005)


def test_equivalent_spellings_format_the_same() -> None:
    """90s and 1m30s are the same duration and format alike."""
    assert format_duration(parse_duration("90s")) == format_duration(parse_duration("1m30s"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5x", '"5x" is not a duration; write a number and a unit (ms, s, m or h), such as '),
        ("1 m", '"1 m" is not a duration'),
        ("-5s", '"-5s" is not a duration'),
        ("1d", '"1d" is not a duration'),
        ("30S", '"30S" is not a duration'),
        ("", "must be a duration such as 250ms, 30s, 5m, 1h or 1m30s, got an empty string"),
        (30, "30 has no unit; write 30s for seconds (or 30ms, 30m, 30h)"),
        (1.5, "1.5 has no unit; write 1.5s for seconds"),
        ("30", "30 has no unit; write 30s for seconds"),
        (True, "must be a duration such as 250ms, 30s, 5m, 1h or 1m30s, got true"),
        (None, "must be a duration such as 250ms, 30s, 5m, 1h or 1m30s, got None"),
    ],
)
def test_errors(value: object, message: str) -> None:
    """Bad durations raise ValueError with a message that quotes the value and shows the fix."""
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert str(caught.value).startswith(message)


class _Timing(BaseModel):
    every: PositiveDuration
    grace: Duration = 0.0


def test_duration_fields_validate_and_serialise_as_text() -> None:
    """In a model, durations read text, hold seconds and dump back to text."""
    timing = _Timing.model_validate({"every": "1m30s", "grace": "0s"})
    assert (timing.every, timing.grace) == (90.0, 0.0)
    assert timing.model_dump() == {"every": "1m30s", "grace": "0s"}


def test_positive_duration_refuses_zero() -> None:
    """Intervals and timeouts must be longer than zero."""
    with pytest.raises(ValidationError, match="must be longer than 0s, got 0ms"):
        _Timing.model_validate({"every": "0ms"})


def test_json_schema_is_a_patterned_string() -> None:
    """Editors see a string with the duration pattern."""
    schema = _Timing.model_json_schema()["properties"]["every"]
    assert schema["type"] == "string"
    assert schema["pattern"] == r"^(\d+(\.\d+)?(ms|s|m|h))+$"
