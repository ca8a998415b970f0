"""``cortex-flow plan``: what ``run`` would create in Redis, and what it finds there.

The current side is read from Redis (its streams, groups and consumers) through
:func:`cortex_flow.ops.drift.drift`, never from a running runner: a reload's view of what
changed is the runner's own (``POST /reload`` on its admin endpoint). When Redis is out
of reach it falls back to the pure :func:`cortex_flow.flow.plan.diff` from nothing, so the plan
is always shown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
)

from cortex_flow.cli.args import load
from cortex_flow.errors import ConnectionFailed, CortexFlowError
from cortex_flow.flow.plan import Change, Plan, diff
from cortex_flow.flow.topology import Resolved, resolve
from cortex_flow.ops.drift import drift, plan_from_drift
from cortex_flow.wire.access import EmbeddedNotRunning, connect, project_url
from cortex_flow.wire.connection import describe_url

__all__ = ["command"]

PROBE_TIMEOUT = 2.0  # how long `plan` waits for Redis before showing the full plan
_PREFIX = {"add": "+", "remove": "-", "change": "~", "drift": "!"}
_SECTIONS = (
    ("setting", "settings"),
    ("stream", "streams"),
    ("key", "keys"),
    ("agent", "agents"),
    ("group", "groups"),
)


async def _inspect(url: str, resolved: Resolved) -> list[Change]:
    client = await connect(url, wait=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT * 5)
    try:
        return await drift(client, resolved)
    except RedisError as exc:
        raise CortexFlowError(f"reading Redis at {describe_url(url)} failed: {exc}") from exc
    finally:
        await client.aclose()


def _format_text(plan: Plan, heading: str) -> str:
    lines = [heading]
    for what, title in _SECTIONS:
        found = [c for c in plan.changes if c.kind != "drift" and c.subject == what]
        if found:
            lines.append(f"{title}:")
            lines += [f"  {_PREFIX[c.kind]} {c}" for c in found]
    found = [c for c in plan.changes if c.kind == "drift"]
    if found:
        lines.append("drift (in Redis, not declared; run leaves it alone):")
        lines += [f"  ! {c}" for c in found]
    if plan.restart_required:
        lines.append("restart needed:")
        lines += [f"  {reason}" for reason in plan.restart_required]
    if plan.empty:
        lines.append("No changes: Redis has every stream and group the flows declare.")
    counts = plan.summary()
    lines.append(
        f"Plan: {counts['create']} to create, {counts['change']} to change, "
        f"{counts['remove']} to remove, {counts['drift']} drift"
    )
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """``cortex-flow plan``: what ``run`` would create in Redis, and what it finds there.

    Compares the flows with the streams and groups in Redis; when Redis cannot be reached
    (or ``embedded`` is not running) it prints the full plan, everything as an add. Changes
    nothing. Exit codes, like ``terraform plan -detailed-exitcode`` (2 stays a usage error):
    0 nothing to create or change (drift alone is informational), 1 error, 3 changes.
    """
    project = load(args)
    resolved = resolve(project.topology, project.config.runner.name)
    notes = []
    url: str | None
    why = ""
    try:
        url = project_url(project)
    except EmbeddedNotRunning:
        url, why = None, "embedded Redis is not running: showing the full plan (run would start it)"
    plan = None
    if url is not None:
        try:
            plan = plan_from_drift(resolved, asyncio.run(_inspect(url, resolved)))
        except ConnectionFailed as exc:
            refused = (AuthenticationError, AuthorizationError, NoPermissionError)
            if isinstance(exc.__cause__, refused):
                raise
            why = f"Redis not reachable: showing the full plan. {exc}"
    if plan is None:
        notes.append(why)
        plan = diff(None, resolved)
    if args.format == "json":
        doc = {
            "runner": resolved.runner,
            "redis": describe_url(url) if url is not None and not why else None,
            "notes": notes,
            "changes": [{**asdict(c), "text": str(c)} for c in plan.changes],
            "restart_required": list(plan.restart_required),
            "summary": plan.summary(),
        }
        print(json.dumps(doc, indent=2))
    else:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        where = f"against Redis at {describe_url(url)}" if url and not why else "(Redis not read)"
        print(_format_text(plan, f"Plan for runner {resolved.runner} {where}:"))
    return 0 if plan.empty else 3
