"""Hot reload: validate everything first, diff, then apply only the difference.

Triggers (file watcher, SIGHUP, ``POST /reload``) all call :func:`reload_runner`.
Outcomes: ``applied``, ``unchanged``, ``rejected`` (invalid or needs a restart;
nothing touched), ``rolled_back`` (applying failed before any consumer changed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex_flow.config import Config
from cortex_flow.errors import ValidationFailed
from cortex_flow.loader import Project, load_project
from cortex_flow.topology import Resolved, resolve

if TYPE_CHECKING:
    from cortex_flow.runner import Runner

log = logging.getLogger("cortex_flow.reload")

# settings read once at start; changing them needs a restart
FIXED: dict[str, Callable[[Config], object]] = {
    "redis.url": lambda c: c.redis.url,
    "runner.name": lambda c: c.runner.name,
    "admin.listen": lambda c: c.admin.listen,
    "log": lambda c: (c.log.level, c.log.format),
}


def _record(
    runner: Runner, outcome: str, started: float, changes: list[str], errors: list[str]
) -> dict[str, Any]:
    state = runner.stats.reload
    state.last_outcome = outcome
    state.last_at = time.time()
    state.last_duration = time.monotonic() - started
    state.last_changes = changes
    state.last_errors = errors
    state.totals[outcome] = state.totals.get(outcome, 0) + 1
    return {
        "outcome": outcome,
        "changes": changes,
        "errors": errors,
        "duration_ms": round(state.last_duration * 1000, 1),
    }


def describe(old: Resolved, new: Resolved) -> tuple[list[str], dict[str, list[str]]]:
    """Plain-words changes and the group actions: add, remove, restart, routes."""
    from cortex_flow.runner import _routes_only

    lines: list[str] = []
    actions: dict[str, list[str]] = {"add": [], "remove": [], "restart": [], "routes": []}
    for name in sorted(new.groups.keys() - old.groups.keys()):
        actions["add"].append(name)
        keys = ", ".join(k.key for k in new.groups[name].keys)
        lines.append(f"group {name}: added (reads {keys})")
    for name in sorted(old.groups.keys() - new.groups.keys()):
        actions["remove"].append(name)
        lines.append(f"group {name}: removed (drains, then stops)")
    for name in sorted(old.groups.keys() & new.groups.keys()):
        a, b = old.groups[name], new.groups[name]
        if a.fingerprint() == b.fingerprint():
            continue
        if _routes_only(a, b):
            actions["routes"].append(name)
            ra, rb = a.spec.routes, b.spec.routes
            for i in range(max(len(ra), len(rb))):
                if i >= len(ra):
                    lines.append(f"group {name}: added route {i + 1}")
                elif i >= len(rb):
                    lines.append(f"group {name}: removed route {i + 1}")
                elif ra[i] != rb[i]:
                    lines.append(f"group {name}: changed route {i + 1}")
        else:
            actions["restart"].append(name)
            da = a.spec.model_dump(mode="json", exclude={"routes"})
            db = b.spec.model_dump(mode="json", exclude={"routes"})
            what = [f"{k} {da.get(k)} -> {db.get(k)}" for k in sorted(db) if da.get(k) != db.get(k)]
            if a.keys != b.keys:
                what.append("keys " + ", ".join(k.key for k in b.keys))
            lines.append(f"group {name}: changed {'; '.join(what) or 'settings'} (restarted)")
    old_keys, new_keys = old.keys(), new.keys()
    for key in sorted(new_keys.keys() - old_keys.keys()):
        k = new_keys[key]
        who = (
            f"agent {k.agent}: inbox"
            if k.agent and k.agent not in old.agents
            else f"stream {k.stream}:"
        )
        lines.append(f"{who} {key} provisioned")
    for agent in sorted(new.agents.keys() - old.agents.keys()):
        lines.append(f"agent {agent}: added")
    for agent in sorted(old.agents.keys() - new.agents.keys()):
        lines.append(f"agent {agent}: removed")
    for agent in sorted(old.agents.keys() & new.agents.keys()):
        if old.agents[agent] != new.agents[agent]:
            lines.append(f"agent {agent}: heartbeat policy changed")
    for name in sorted(old.streams.keys() & new.streams.keys()):
        if old.streams[name].spec != new.streams[name].spec:
            lines.append(f"stream {name}: settings changed")
    return lines, actions


async def reload_runner(runner: Runner, reason: str) -> dict[str, Any]:
    """One reload; never raises for bad input, the running topology stays as it was."""
    started = time.monotonic()
    config_path = runner.project.config_path or (runner.project.base_dir / "config.yaml")
    try:
        project: Project = await asyncio.to_thread(load_project, config_path)
        new = resolve(project.topology, runner.name)
        from cortex_flow.runner import route_tables

        tables = route_tables(new)
    except ValidationFailed as exc:
        errors = [str(p) for p in exc.problems]
        log.error(
            "rejecting update (%s): %d problem(s); still running the previous topology",
            reason,
            len(errors),
        )
        for line in errors:
            log.error("  %s", line)
        return _record(runner, "rejected", started, [], errors)
    fixed = [
        f"{name} changed: restart the runner to apply it"
        for name, get in FIXED.items()
        if get(project.config) != get(runner.config)
    ]
    if fixed:
        for line in fixed:
            log.error("rejecting update (%s): %s", reason, line)
        return _record(runner, "rejected", started, [], fixed)
    old = runner.resolved
    assert old is not None
    lines, actions = describe(old, new)
    if not lines:
        runner.project = project
        log.info("reload (%s): nothing changed", reason)
        return _record(runner, "unchanged", started, [], [])
    try:
        await runner._provision(new)
    except Exception as exc:
        log.error(
            "reload (%s) failed while provisioning (%s); rolled back, still running the "
            "previous topology",
            reason,
            exc,
        )
        return _record(runner, "rolled_back", started, [], [f"provisioning failed: {exc}"])
    for name in actions["add"]:
        runner._start_group(new, new.groups[name], tables[name])
    for name in actions["restart"]:
        old_consumer = runner.consumers[name]
        runner._start_group(new, new.groups[name], tables[name], predecessor=old_consumer.done)
        runner._retire(old_consumer)  # make-before-break: the new one already reads
    for name in actions["routes"]:
        runner.consumers[name].swap_routes(tables[name])
    for name in actions["remove"]:
        runner._retire(runner.consumers.pop(name))
        runner.stats.groups.pop(name, None)
    if runner._heartbeats is not None:
        runner._heartbeats.update(new)
    runner.project, runner.resolved, runner.tables = project, new, tables
    result = _record(runner, "applied", started, lines, [])
    for line in lines:
        log.info("%s", line)
    log.info(
        "reload (%s) applied in %.0fms: %d change(s)", reason, result["duration_ms"], len(lines)
    )
    return result


async def watch_changes(project: Project, stop: asyncio.Event) -> AsyncIterator[set[Any]]:
    """Yield once per debounced batch of changes to config.yaml or the flows folder."""
    import watchfiles

    paths: list[Path] = [project.flows_dir]
    if project.config_path is not None:
        paths.append(project.config_path.resolve())
    debounce = int(project.config.reload.debounce * 1000)

    def relevant(change: Any, path: str) -> bool:
        return path.endswith((".yaml", ".yml"))

    async for changes in watchfiles.awatch(
        *paths,
        debounce=debounce,
        step=20,
        stop_event=stop,
        watch_filter=relevant,
        recursive=False,
    ):
        yield changes
