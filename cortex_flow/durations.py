"""The duration type used in flow files and config: ``250ms``, ``30s``, ``5m``, ``1h``."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h))+$"


def parse_duration(value: Any) -> float:
    """Parse ``"1m30s"``-style text into seconds; raise ``ValueError`` with a readable message."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"must be a duration string such as 250ms, 30s, 5m or 1h, got {value!r}")
    text = value.strip()
    pos, total = 0, 0.0
    while pos < len(text):
        match = _PART.match(text, pos)
        if not match:
            raise ValueError(
                f"{value!r} is not a duration; write a number and a unit (ms, s, m, h), "
                "such as 250ms, 30s, 5m or 1h"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text:
        raise ValueError("must be a duration such as 250ms, 30s, 5m or 1h, got an empty string")
    return total


def format_duration(seconds: float) -> str:
    """Render seconds back into the shortest exact duration text (``90.0`` -> ``1m30s``)."""
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": PATTERN,
            "description": "A duration: a number and a unit (ms, s, m, h), e.g. 250ms, 30s, 5m.",
        }
    ),
]
