"""What ``status`` says of flow control: delayed messages waiting, limits that bind nothing."""

from __future__ import annotations

from typing import Any

from cortex_flow.errors import Problem
from cortex_flow.flow.flowcontrol import unbound_in_flight
from cortex_flow.flow.topology import Resolved
from cortex_flow.wire.delayed import parse_summary

LIVE_IDLE = 60.0  # a consumer idle longer is not counted as a runner serving its group


def delayed_rows(reply: Any, now: float) -> list[dict[str, Any]] | None:
    """For status, from :data:`~cortex_flow.wire.delayed.SUMMARY`'s reply (a command of
    status's first pipeline): per stream key, how many delayed messages wait and when the
    next is due (seconds from ``now``, epoch seconds; negative: overdue, no runner moving
    them). None when Redis refused it (an ACL without the namespace's keys)."""
    if isinstance(reply, Exception):
        return None
    return [
        {"key": key, "waiting": n, "next_due_in": round(due / 1000 - now, 3)}
        for key, (n, due) in sorted(parse_summary(reply).items())
    ]


def in_flight_warnings(groups: list[dict[str, Any]], resolved: Resolved) -> list[Problem]:
    """``max_in_flight`` above the concurrency of the consumers that read the group now
    (idle under a minute: a runner that reads blocks for a second at most)."""
    live: dict[str, set[str]] = {}
    for row in groups:
        for consumer in row.get("consumers") or []:
            if consumer["idle"] < LIVE_IDLE:
                live.setdefault(row["name"], set()).add(consumer["name"])
    found = []
    for name, consumers in sorted(live.items()):
        group = resolved.groups.get(name)
        # an agent's inbox group (read by its client, declared under agents:) has no limit
        if group is not None and group.by_runner and group.spec.max_in_flight is not None:
            origin = resolved.topology.origin("groups", name)
            problem = unbound_in_flight(origin, group.spec, len(consumers))
            if problem is not None:
                found.append(problem)
    return found


__all__ = ["delayed_rows", "in_flight_warnings"]
