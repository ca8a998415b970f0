"""Consumer-group lag where Redis does not report it (6.2: XINFO GROUPS has no ``lag``).

Counted as the entries after the group's last-delivered ID, up to a cap, so a large
backlog costs a bounded read; past the cap the lag is unknown (None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

STATUS_CAP = 10_000
METRICS_CAP = 1_000


async def count_unread(
    client: Any, wanted: Sequence[tuple[str, str]], cap: int
) -> dict[tuple[str, str], int | None]:
    """``(key, last_delivered_id)`` -> entries after that ID (None past ``cap`` or on error)."""
    if not wanted:
        return {}
    pipe = client.pipeline(transaction=False)
    for key, last in wanted:
        pipe.xrange(key, f"({last}", "+", count=cap + 1)
    out: dict[tuple[str, str], int | None] = {}
    for pair, rows in zip(wanted, await pipe.execute(raise_on_error=False), strict=True):
        ok = not isinstance(rows, BaseException) and len(rows) <= cap
        out[pair] = len(rows) if ok else None
    return out
