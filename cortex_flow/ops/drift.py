"""What Redis holds compared with the flows: what ``run`` would still create there, and
what it finds there that no flow declares.

The one part of planning that reads Redis; :mod:`cortex_flow.flow.plan` is the pure diff.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.flow.durations import format_duration
from cortex_flow.flow.plan import Change, Plan, declared_keys
from cortex_flow.flow.topology import Resolved, ResolvedGroup, wrong_type_problem
from cortex_flow.wire.connection import RedisClient
from cortex_flow.wire.groups import wrong_types
from cortex_flow.wire.lag import STATUS_CAP, count_unread

__all__ = ["drift", "plan_from_drift", "wrong_type_keys"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def drift(client: RedisClient, resolved: Resolved) -> list[Change]:
    """Compare Redis with ``resolved``: what ``run`` would create, and what it would not expect.

    Missing streams and groups come back as adds ("run would create it"); groups no flow
    declares on a known key, and consumers of declared groups that are not this runner's,
    as ``drift``. A missing key is tolerated; a key that is not a stream is left to
    :func:`wrong_type_keys`.
    """
    readers: dict[str, list[ResolvedGroup]] = {}
    for group in resolved.groups.values():
        for k in group.keys:
            readers.setdefault(k.key, []).append(group)
    changes: list[Change] = []
    for key in declared_keys(resolved):
        groups = readers.get(key, [])
        names = ", ".join(g.name for g in groups)
        try:
            infos = await client.xinfo_groups(key)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                if groups:
                    text = f"stream missing: run would create it with group(s) {names}"
                    changes.append(Change("add", "key", key, text))
                continue
            if "wrongtype" not in str(exc).lower():
                raise
            continue  # a problem, not a change: see wrong_type_keys
        present = {_text(info["name"]): info for info in infos}
        for group in groups:
            if group.name not in present:
                text = f"missing on {key}: run would create it (start {group.spec.start})"
                changes.append(Change("add", "group", group.name, text))
        for name, info in present.items():
            if name not in {g.name for g in groups}:
                lag = info.get("lag")
                if lag is None:  # Redis 6.2 reports none: count it, up to a cap
                    last = _text(info["last-delivered-id"])
                    lag = (await count_unread(client, [(key, last)], STATUS_CAP))[(key, last)]
                holds = "?" if lag is None else f"{int(lag) + int(info['pending']):,}"
                text = (
                    f"stale on {key}: no flow declares it there ({info['consumers']} "
                    f"consumer(s), {info['pending']} pending); it holds {holds} entries from "
                    f"retention; `cortex-flow prune {name}` removes it"
                )
                changes.append(Change("drift", "group", name, text))
        for group in groups:
            if group.name not in present or not present[group.name]["consumers"]:
                continue
            for consumer in await client.xinfo_consumers(key, group.name):
                who = _text(consumer["name"])
                if who != group.consumer:
                    idle = format_duration(int(consumer["idle"]) / 1000)
                    text = (
                        f"consumer {who} on {key} is not this runner's ({group.consumer}): "
                        f"{consumer['pending']} pending, idle {idle}"
                    )
                    changes.append(Change("drift", "group", group.name, text))
    return changes


def plan_from_drift(resolved: Resolved, changes: list[Change]) -> Plan:
    """The plan ``run`` would carry out: the streams and groups :func:`drift` found missing."""
    missing = [c.name for c in changes if c.kind == "add" and c.what == "key"]
    groups = {c.name for c in changes if c.kind == "add" and c.what == "group"}
    groups |= {g.name for g in resolved.groups.values() if {k.key for k in g.keys} & set(missing)}
    return Plan(
        changes=tuple(changes),
        groups_to_add=tuple(name for name in resolved.groups if name in groups),
        keys_to_create=tuple(missing),
    )


async def wrong_type_keys(client: RedisClient, resolved: Resolved) -> list[str]:
    """One line per declared key holding something other than a stream (``run`` refuses)."""
    found = await wrong_types(client, declared_keys(resolved))
    return [wrong_type_problem(resolved, key, held) for key, held in found.items()]
