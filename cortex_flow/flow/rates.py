"""The rate type of flow files: ``60/m``, ``20/s``, ``1000/h`` (a count per unit of time).

Kept as written (``60/m`` reads better in ``graph`` and errors than ``1.0``);
:func:`per_second` turns it into a number for the runtime.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
PATTERN = r"^\d+(\.\d+)?/(s|m|h)$"
_FORM = re.compile(PATTERN)


def check_rate(value: Any) -> str:
    """``value`` as a rate text; raise ``ValueError`` naming the form when it is not one."""
    text = value.strip() if isinstance(value, str) else None
    if text is None or not _FORM.match(text):
        shown = f'"{value}"' if isinstance(value, str) else repr(value)
        raise ValueError(
            f"{shown} is not a rate; write a count, a slash and a unit (s, m or h), "
            "such as 20/s, 60/m or 1000/h"
        )
    if per_second(text) <= 0:
        raise ValueError(f'rate must be above zero, got "{text}"')
    return text


def per_second(rate: str) -> float:
    """``"60/m"`` -> 1.0."""
    count, _, unit = rate.partition("/")
    return float(count) / _UNITS[unit]


Rate = Annotated[
    str,
    BeforeValidator(check_rate),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": PATTERN,
            "description": "A rate: a count per unit of time (s, m, h), e.g. 20/s, 60/m.",
        }
    ),
]
"""A positive rate, written ``<count>/<unit>``."""
