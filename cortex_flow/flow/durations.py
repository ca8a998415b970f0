"""The duration type used in flow files and config: ``250ms``, ``30s``, ``5m``, ``1h``.

Parts may be combined, largest first or not (``1m30s``, ``1h30m``); each part is a
number, optionally with a fraction (``1.5s``), and a unit. Values are seconds as float.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h))+$"
_EXAMPLES = "such as 250ms, 30s, 5m, 1h or 1m30s"


def parse_duration(value: Any) -> float:
    """Parse ``"1m30s"``-style text into seconds; raise ``ValueError`` with a readable message."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _bare_number(value)
    if not isinstance(value, str):
        shown = "true" if value is True else "false" if value is False else repr(value)
        raise ValueError(f"must be a duration {_EXAMPLES}, got {shown}")
    text = value.strip()
    if not text:
        raise ValueError(f"must be a duration {_EXAMPLES}, got an empty string")
    pos, total = 0, 0.0
    while pos < len(text):
        match = _PART.match(text, pos)
        if not match:
            if text.replace(".", "", 1).isdigit():
                return _bare_number(float(text))
            raise ValueError(
                f'"{value}" is not a duration; write a number and a unit (ms, s, m or h), '
                f"{_EXAMPLES}"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return total


def _bare_number(number: float) -> float:
    raise ValueError(
        f"{number:g} has no unit; write {number:g}s for seconds "
        f"(or {number:g}ms, {number:g}m, {number:g}h)"
    )


def format_duration(seconds: float) -> str:
    """Render seconds back into the shortest exact duration text (``90.0`` -> ``1m30s``).

    Precision is one millisecond: ``parse_duration(format_duration(x))`` equals ``x``
    rounded to the millisecond.
    """
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _positive(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be longer than 0s, got {value}")
    return seconds


_SCHEMA = {
    "type": "string",
    "pattern": PATTERN,
    "description": "A duration: a number and a unit (ms, s, m, h), e.g. 250ms, 30s, 5m.",
}

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(_SCHEMA),
]
"""A duration of zero or more seconds."""

PositiveDuration = Annotated[
    float,
    BeforeValidator(_positive),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(_SCHEMA),
]
"""A duration longer than zero (intervals, timeouts)."""


def humanize(seconds: float | None) -> str:
    """``3s``, ``4m12s``, ``2h``, ``3d4h``; ``-`` for unknown."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms" if seconds > 0 else "0s"
    total = int(seconds)
    for big, small, size, small_size in (("d", "h", 86400, 3600), ("h", "m", 3600, 60)):
        if total >= size:
            rest = (total % size) // small_size
            return f"{total // size}{big}" + (f"{rest}{small}" if rest else "")
    minutes, secs = divmod(total, 60)
    if minutes:
        return f"{minutes}m" + (f"{secs}s" if secs else "")
    return f"{secs}s"
