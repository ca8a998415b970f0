"""``cortex-flow plan``: what a reload of the running runner, or ``run``, would change.

When the runner's admin endpoint answers (``GET /topology``), its running flows and
settings are the current side and the plan is the pure :func:`cortex_flow.flow.plan.diff`
a reload computes: groups to start, restart or stop, route tables to swap. Otherwise the
current side is Redis (:func:`cortex_flow.ops.drift.drift`: streams and groups ``run``
would create), and the plan says it compared with Redis alone. When Redis is out of reach
too, it is the diff from nothing, so a plan is always shown. Keys that hold something
other than a stream are problems: ``run`` would refuse to start.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from dataclasses import asdict
from typing import Any

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
)

from cortex_flow.cli.args import load
from cortex_flow.errors import ConnectionFailed, CortexFlowError
from cortex_flow.flow.exposed import read_doc, topology_doc
from cortex_flow.flow.loader import Project
from cortex_flow.flow.plan import Change, Plan, diff
from cortex_flow.flow.topology import Resolved, resolve
from cortex_flow.ops.admin import admin_get, admin_url
from cortex_flow.ops.drift import drift, plan_from_drift, wrong_type_keys
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


async def _inspect(url: str, resolved: Resolved) -> tuple[list[Change], list[str]]:
    """What Redis holds compared with the flows, and the keys that are not streams."""
    client = await connect(url, wait=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT * 5)
    try:
        return await drift(client, resolved), await wrong_type_keys(client, resolved)
    except RedisError as exc:
        raise CortexFlowError(f"reading Redis at {describe_url(url)} failed: {exc}") from exc
    finally:
        await client.aclose()


async def _running(project: Project) -> tuple[Resolved, Any] | str:
    """The running runner's resolved topology and config, or why there is none."""
    admin = project.config.admin
    if admin.host_port is None:
        return "admin.listen is off, so no runner was asked"
    status, body = await admin_get(admin, "/topology", timeout=PROBE_TIMEOUT)
    where = admin.listen or "admin endpoint"
    if status is None:
        return f"no runner answered at {where} ({body})"
    if status != 200:
        error = body.get("error") if isinstance(body, dict) else None
        return f"the runner at {where} answered /topology with {status} ({error or body})"
    name, topology, config = read_doc(body)
    if name != project.config.runner.name:
        return f"the runner at {where} is named {name}, not {project.config.runner.name}"
    return resolve(topology, name), config


def _redacted(project: Project, runner: str) -> tuple[Resolved, Any]:
    """The flows on disk as the runner would serve them (secrets as digests)."""
    _, topology, config = read_doc(topology_doc(project.topology, project.config, runner))
    return resolve(topology, runner), config


def _reload_summary(plan: Plan) -> str:
    parts = [
        f"{what} {', '.join(names)}"
        for what, names in (
            ("start", plan.groups_to_add),
            ("restart", plan.groups_to_restart),
            ("stop", plan.groups_to_remove),
            ("swap the routes of", plan.groups_routes_only),
        )
        if names
    ]
    if plan.restart_required:
        return "a reload would be rejected: a setting needs a restart"
    return "a reload would " + "; ".join(parts) if parts else ""


def _format_text(plan: Plan, heading: str, problems: list[str], against: str) -> str:
    lines = [heading]
    if problems:
        lines.append("problems (run refuses to start until they are fixed):")
        lines += [f"  x {p}" for p in problems]
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
    if against == "runner" and (summary := _reload_summary(plan)):
        lines.append(summary)
    if plan.empty:
        lines.append(
            "No changes: the running runner already runs these flows."
            if against == "runner"
            else "No changes: Redis has every stream and group the flows declare."
        )
    counts = plan.summary()
    lines.append(
        f"Plan: {counts['create']} to create, {counts['change']} to change, "
        f"{counts['remove']} to remove, {counts['drift']} drift"
    )
    return "\n".join(lines)


def _from_redis(url: str | None, resolved: Resolved) -> tuple[list[Change], list[str]] | str:
    """Drift and wrong-type keys from Redis, or why Redis was not read."""
    if url is None:
        return "embedded Redis is not running: showing the full plan (run would start it)"
    try:
        return asyncio.run(_inspect(url, resolved))
    except ConnectionFailed as exc:
        refused = (AuthenticationError, AuthorizationError, NoPermissionError)
        if isinstance(exc.__cause__, refused):
            raise
        return f"Redis not reachable: showing the full plan. {exc}"


def _json_doc(
    plan: Plan, runner: str, against: str, url: str | None, notes: list[str], problems: list[str]
) -> dict[str, Any]:
    reload = {
        "start": list(plan.groups_to_add),
        "restart": list(plan.groups_to_restart),
        "stop": list(plan.groups_to_remove),
        "swap_routes": list(plan.groups_routes_only),
    }
    return {
        "runner": runner,
        "compared_with": against,  # runner | redis | nothing
        "redis": describe_url(url) if url is not None else None,
        "notes": notes,
        "problems": problems,
        "changes": [{**asdict(c), "text": str(c)} for c in plan.changes],
        "restart_required": list(plan.restart_required),
        "reload": reload if against == "runner" else None,
        "summary": plan.summary(),
    }


def command(args: argparse.Namespace) -> int:
    """``cortex-flow plan``: what a reload of the running runner, or ``run``, would change.

    Changes nothing. Exit codes, like ``terraform plan -detailed-exitcode`` (2 stays a
    usage error): 0 nothing to create or change (drift alone is informational), 1 error
    or a problem that makes ``run`` refuse (a key that is not a stream), 3 changes.
    """
    project = load(args)
    resolved = resolve(project.topology, project.config.runner.name)
    notes = []
    try:
        url: str | None = project_url(project)
    except EmbeddedNotRunning:
        url = None
    redis = _from_redis(url, resolved)
    running = asyncio.run(_running(project))
    problems = [] if isinstance(redis, str) else redis[1]
    if not isinstance(running, str):
        against = "runner"
        current, current_config = running
        target, target_config = _redacted(project, resolved.runner)
        plan = diff(current, target, current_config, target_config)
        if not isinstance(redis, str):
            extra = tuple(c for c in redis[0] if c.kind == "drift")
            plan = dataclasses.replace(plan, changes=plan.changes + extra)
        else:
            notes.append(f"Redis not read for drift and key types: {redis}")
        where = f"the running runner at {admin_url(project.config.admin, '')}"
        heading = f"Plan for runner {resolved.runner}: what a reload of {where} would do:"
    elif not isinstance(redis, str):
        against = "redis"
        notes.append(f"{running}: compared with Redis alone")
        plan = plan_from_drift(resolved, redis[0])
        heading = (
            f"Plan for runner {resolved.runner} against Redis at {describe_url(url or '')} "
            "(no running runner: compared with Redis alone):"
        )
    else:
        against = "nothing"
        notes += [running, redis]
        plan = diff(None, resolved)
        heading = f"Plan for runner {resolved.runner} (neither the runner nor Redis read):"
    if args.format == "json":
        read = url if url is not None and not isinstance(redis, str) else None
        doc = _json_doc(plan, resolved.runner, against, read, notes, problems)
        print(json.dumps(doc, indent=2))
    else:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(_format_text(plan, heading, problems, against))
    if problems:
        return 1
    return 0 if plan.empty else 3
