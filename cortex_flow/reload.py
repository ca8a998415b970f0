"""Hot reload: validate everything first, diff, then apply only the difference.

Triggers (file watcher, SIGHUP, ``POST /reload``) all call :meth:`Runner.reload`, which
runs :func:`reload_runner` under the runner's reload lock, so two reloads never overlap.
The difference is :func:`cortex_flow.plan.diff`, the same plan ``cortex-flow plan``
prints. Outcomes:

- ``applied``: the plan was applied; ``unchanged``: there was nothing to apply;
- ``rejected``: the files are invalid, a setting that needs a restart changed, or the
  runner is starting or stopping; nothing was touched;
- ``rolled_back``: creating the new groups in Redis failed (Redis unreachable for
  ``PROVISION_TIMEOUT``); no consumer was changed, the previous topology keeps running.

Applying is make-before-break: a changed group's new consumer (same consumer name) is
started before the old one is told to stop, and re-reads its pending entries only once
the old one has finished and acknowledged what it held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from cortex_flow.callpool import threads_needed
from cortex_flow.consumer import TRANSIENT
from cortex_flow.errors import ValidationFailed
from cortex_flow.loader import Project, load_project
from cortex_flow.plan import Plan, diff
from cortex_flow.routes import RouteTable
from cortex_flow.topology import Resolved, resolve

if TYPE_CHECKING:
    from cortex_flow.runner import Runner

log = logging.getLogger("cortex_flow.reload")

# how long a reload keeps trying to reach Redis to create new groups before rolling back
PROVISION_TIMEOUT = 10.0


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


def _reject(runner: Runner, reason: str, started: float, errors: list[str]) -> dict[str, Any]:
    log.error(
        "rejecting update (%s): %d problem(s); still running the previous topology",
        reason,
        len(errors),
    )
    for line in errors:
        log.error("  %s", line)
    return _record(runner, "rejected", started, [], errors)


def _load(runner: Runner) -> tuple[Project, Resolved, dict[str, RouteTable]]:
    from cortex_flow.runner import route_tables

    # started without a config file: read one that appeared since, else keep the defaults
    default = runner.project.base_dir / "config.yaml"
    config_path = runner.project.config_path or (default if default.exists() else None)
    project = load_project(config_path)
    new = resolve(project.topology, runner.name)
    return project, new, route_tables(new)


async def _provision(runner: Runner, new: Resolved, plan: Plan) -> None:
    """Create the groups the plan starts, retrying a lost Redis until the deadline."""
    wanted = [
        (new.groups[n], key)
        for n in (*plan.groups_to_add, *plan.groups_to_restart)
        for key in new.groups[n].keys
    ]
    deadline = time.monotonic() + PROVISION_TIMEOUT
    delay = 0.05
    while True:
        try:
            for group, key in wanted:
                await runner._create_group(group, key.key)
            return
        except TRANSIENT as exc:
            if runner.stopping or time.monotonic() + delay > deadline:
                raise
            log.warning("reload: cannot reach Redis to create groups (%s); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def _apply(
    runner: Runner, project: Project, new: Resolved, tables: dict[str, RouteTable], plan: Plan
) -> None:
    """Start, swap and retire consumers. No awaits: a reload is never half applied."""
    if runner.executor.grow(threads_needed(new, tables)):
        log.info("sync calls now run in a pool of %d threads", runner.executor.threads)
    runner._ensure_http(new)
    for name in plan.groups_to_add:
        runner._start_group(new, new.groups[name], tables[name])
    for name in plan.groups_to_restart:
        old = runner.consumers[name]
        # make-before-break: the successor waits for old.done before re-reading pending
        runner._start_group(new, new.groups[name], tables[name], predecessor=old.done)
        runner._retire(old)
    for name in plan.groups_to_remove:
        runner._retire(runner.consumers.pop(name))
        runner.stats.groups.pop(name, None)
    for name in plan.groups_routes_only:
        runner.consumers[name].swap_routes(tables[name])
    if project.config.log.level != runner.config.log.level:
        logging.getLogger().setLevel(project.config.log.level.upper())
    if runner._heartbeats is not None:
        runner._heartbeats.runner_interval = project.config.runner.heartbeat_interval
        if runner._heartbeats.update(new):  # a new heartbeat key: beat and watch moved there
            log.info("heartbeats: now on %s", new.heartbeat_key or "no stream (removed)")
    runner.project, runner.config = project, project.config
    runner.resolved, runner.tables = new, tables


def _summary(plan: Plan) -> str:
    parts = [
        f"{what} {', '.join(names)}"
        for what, names in (
            ("started", plan.groups_to_add),
            ("restarted", plan.groups_to_restart),
            ("stopped", plan.groups_to_remove),
            ("routes swapped", plan.groups_routes_only),
        )
        if names
    ]
    return "; groups " + "; ".join(parts) if parts else ""


async def reload_runner(runner: Runner, reason: str) -> dict[str, Any]:
    """One reload; never raises for bad input, the running topology stays as it was."""
    started = time.monotonic()
    old = runner.resolved
    if old is None or runner.stopping:
        state = "stopping" if runner.stopping else "still starting"
        return _reject(runner, reason, started, [f"runner is {state}: reload not applied"])
    try:
        project, new, tables = await asyncio.to_thread(_load, runner)
    except ValidationFailed as exc:
        return _reject(runner, reason, started, [str(p) for p in exc.problems])
    plan = diff(old, new, runner.config, project.config)
    if plan.restart_required:
        return _reject(runner, reason, started, list(plan.restart_required))
    if plan.empty:
        runner.project = project
        result = _record(runner, "unchanged", started, [], [])
        log.info("reload (%s): nothing changed (%.0fms)", reason, result["duration_ms"])
        return result
    stopping = ["runner is stopping: reload not applied"]
    if runner.stopping:
        return _reject(runner, reason, started, stopping)
    try:
        await _provision(runner, new, plan)
    except (*TRANSIENT, ResponseError) as exc:
        if runner.stopping:
            return _reject(runner, reason, started, stopping)
        hint = (
            "Reload again once Redis is back"
            if isinstance(exc, TRANSIENT)
            else "If that key is not a stream, rename the stream's key or remove the key"
        )
        log.error(
            "reload (%s) rolled back: cannot create groups in Redis (%s); still running the "
            "previous topology. %s",
            reason,
            exc,
            hint,
        )
        return _record(runner, "rolled_back", started, [], [f"provisioning failed: {exc}"])
    if runner.stopping:  # stop() began while we provisioned: start nothing now
        return _reject(runner, reason, started, stopping)
    _apply(runner, project, new, tables, plan)
    lines = [str(c) for c in plan.changes]
    result = _record(runner, "applied", started, lines, [])
    for line in lines:
        log.info("%s", line)
    log.info(
        "reload (%s) applied in %.0fms: %d change(s)%s",
        reason,
        result["duration_ms"],
        len(lines),
        _summary(plan),
    )
    return result


async def watch_changes(project: Project, stop: asyncio.Event) -> AsyncIterator[set[Any]]:
    """Yield once per debounced batch of changes to config.yaml or the flows folder.

    Folders are watched, not files: an editor that saves by renaming a new file over the
    old one would leave a watch on the file itself pointing at the deleted inode.
    """
    import watchfiles

    flows = project.flows_dir.resolve()
    config = project.config_path.resolve() if project.config_path is not None else None
    paths = {flows} | ({config.parent} if config is not None else set())
    debounce = int(project.config.reload.debounce * 1000)

    def relevant(change: Any, path: str) -> bool:
        p = Path(path)
        if config is not None and p == config:
            return True
        return p.parent == flows and p.suffix in (".yaml", ".yml")

    async for changes in watchfiles.awatch(
        *sorted(paths),
        debounce=debounce,
        step=20,
        stop_event=stop,
        watch_filter=relevant,
        recursive=False,
    ):
        yield changes
