"""Consumer-group lag: the entries of a key its group has not read yet.

Redis 7 reports it (XINFO GROUPS ``lag``, from the group's ``entries-read`` counter);
6.2 does not. The counter is not always right: a replica promoted by a failover
reported lag 7,299 for a stream its group had read to the end with nothing pending.
So the reported figure is only the last resort: a group that has read up to the
key's newest entry has lag 0; otherwise the entries after its last-delivered ID are
counted, up to a cap, so a large backlog costs a bounded read. Past the cap the
reported lag stands (None where Redis reports none: unknown).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cortex_flow.wire.entryids import id_key

STATUS_CAP = 10_000
METRICS_CAP = 1_000


def read_to_end(last_delivered: str, newest: str | None) -> bool:
    """Whether a group that last delivered ``last_delivered`` has read every entry of a
    key whose newest entry is ``newest`` (None: the key is empty)."""
    return newest is None or id_key(last_delivered) >= id_key(newest)


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


async def group_lags(
    client: Any,
    groups: Sequence[tuple[str, str, Any]],
    newest: Mapping[str, str | None],
    cap: int,
) -> dict[tuple[str, str], int | None]:
    """``(key, last_delivered_id, reported lag)`` -> the lag to show (see the module).

    ``newest``: each key's newest entry ID (None: empty). A key missing from it is
    counted.
    """
    out: dict[tuple[str, str], int | None] = {}
    behind: list[tuple[str, str]] = []
    reported: dict[tuple[str, str], int | None] = {}
    for key, last, lag in groups:
        pair = (key, last)
        if key in newest and read_to_end(last, newest[key]):
            out[pair] = 0
        else:
            behind.append(pair)
            reported[pair] = None if lag is None else int(lag)
    for pair, counted in (await count_unread(client, behind, cap)).items():
        out[pair] = counted if counted is not None else reported[pair]
    return out
