"""Consumer groups in Redis that no flow declares: found, described, and pruned.

Such a group (left by a flow that was renamed or removed, or made by hand) still holds
retention: its unread and pending entries are never trimmed. ``status`` and ``plan``
list it as stale with how much it holds; ``cortex-flow prune GROUP`` destroys it.
"""

from __future__ import annotations

from typing import Any

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.plan import declared_keys
from cortex_flow.flow.topology import Resolved
from cortex_flow.wire.lag import STATUS_CAP, count_unread

__all__ = ["count_lag", "destroy", "read_stale", "stale_from_infos"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stale_from_infos(
    resolved: Resolved, infos: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The undeclared groups in XINFO GROUPS replies by key, as plain rows.

    ``holds``: the entries retention keeps for the group (unread plus pending); None when
    the server does not know its lag.
    """
    readers: dict[str, set[str]] = {}
    for group in resolved.groups.values():
        for k in group.keys:
            readers.setdefault(k.key, set()).add(group.name)
    rows = []
    for key, groups in infos.items():
        for info in groups:
            name = _text(info["name"])
            if name in readers.get(key, set()):
                continue
            lag = info.get("lag")
            pending = int(info["pending"])
            rows.append(
                {
                    "name": name,
                    "key": key,
                    "consumers": int(info["consumers"]),
                    "pending": pending,
                    "lag": None if lag is None else int(lag),
                    "holds": None if lag is None else int(lag) + pending,
                    "last_delivered_id": _text(info["last-delivered-id"]),
                }
            )
    return rows


async def read_stale(client: Any, resolved: Resolved) -> list[dict[str, Any]]:
    """Every undeclared group on the flows' keys (one pipelined XINFO GROUPS per key)."""
    keys = declared_keys(resolved)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xinfo_groups(key)
    replies = await pipe.execute(raise_on_error=False) if keys else []
    infos = {
        key: reply for key, reply in zip(keys, replies, strict=True) if isinstance(reply, list)
    }
    return await count_lag(client, stale_from_infos(resolved, infos))


async def count_lag(client: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill in the lag (and so ``holds``) the server did not report (Redis 6.2), counted
    up to :data:`STATUS_CAP` entries; past it, both stay unknown."""
    wanted = [(r["key"], r["last_delivered_id"]) for r in rows if r["lag"] is None]
    counted = await count_unread(client, wanted, STATUS_CAP)
    for row in rows:
        if row["lag"] is None:
            lag = counted.get((row["key"], row["last_delivered_id"]))
            row["lag"] = lag
            row["holds"] = None if lag is None else lag + row["pending"]
    return rows


async def destroy(client: Any, resolved: Resolved, group: str, rows: list[dict[str, Any]]) -> int:
    """XGROUP DESTROY ``group`` on the keys of ``rows``; how many it was destroyed on.

    Refuses a group the flows declare: the runner would only create it again.
    """
    if group in resolved.groups:
        raise CortexFlowError(
            f"group {group} is declared in the flows; prune removes only groups no flow "
            "declares (remove it from the flows first, then prune it)"
        )
    done = 0
    for row in rows:
        done += int(await client.xgroup_destroy(row["key"], group))
    return done
