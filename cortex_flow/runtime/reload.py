"""Hot reload: validate everything first, diff, then apply only the difference.

Triggers (file watcher, SIGHUP, ``POST /reload``) all call :meth:`Runner.reload`, which
runs :func:`reload_topology` under the runner's reload lock, so two reloads never overlap.
The difference is :func:`cortex_flow.flow.plan.diff`, the same plan ``cortex-flow plan``
prints. Outcomes:

- ``applied``: the plan was applied; ``unchanged``: there was nothing to apply;
- ``rejected``: the files are invalid, a setting that needs a restart changed, or the
  runner is starting or stopping; nothing was touched;
- ``rolled_back``: creating the new groups in Redis failed (Redis unreachable for
  ``PROVISION_TIMEOUT``); no consumer was changed, the previous topology keeps running.

Applying is :meth:`RunningTopology.apply`, the same step that starts the runner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.errors import ValidationFailed
from cortex_flow.flow.loader import Project, load_project
from cortex_flow.flow.plan import Plan, diff
from cortex_flow.flow.topology import Resolved, no_reader, resolve, unread_inboxes
from cortex_flow.runtime.consumer import TRANSIENT
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.running import RunningTopology, apply_settings, route_tables
from cortex_flow.runtime.stats import ReloadState

log = logging.getLogger("cortex_flow.reload")

# how long a reload keeps trying to reach Redis to create new groups before rolling back
PROVISION_TIMEOUT = 10.0


@dataclass
class Reload:
    """One reload's inputs: what runs now, and how to tell that the runner is stopping."""

    running: RunningTopology | None  # None while the runner is still starting
    project: Project
    name: str  # the runner's name: consumer names derive from it
    state: ReloadState
    stopping: Callable[[], bool]


def _record(
    reload: Reload, outcome: str, started: float, changes: list[str], errors: list[str]
) -> dict[str, Any]:
    state = reload.state
    state.last_outcome = outcome
    state.last_at = time.time()
    state.last_duration = time.monotonic() - started
    state.last_changes = changes
    state.last_errors = errors
    state.totals[outcome] = state.totals.get(outcome, 0) + 1
    state.history.append(
        {"outcome": outcome, "at": state.last_at, "changes": changes, "errors": errors}
    )
    return {
        "outcome": outcome,
        "changes": changes,
        "errors": errors,
        "duration_ms": round(state.last_duration * 1000, 1),
    }


def _reject(reload: Reload, reason: str, started: float, errors: list[str]) -> dict[str, Any]:
    log.error(
        "rejecting update (%s): %d problem(s); still running the previous topology",
        reason,
        len(errors),
    )
    for line in errors:
        log.error("  %s", line)
    return _record(reload, "rejected", started, [], errors)


def load_again(current: Project, name: str) -> tuple[Project, Resolved, dict[str, RouteTable]]:
    """Read the files again (the config file the runner started from, or one since made)."""
    # started without a config file: read one that appeared since, else keep the defaults
    default = current.base_dir / "config.yaml"
    config_path = current.config_path or (default if default.exists() else None)
    project = load_project(config_path)
    new = resolve(project.topology, name)
    return project, new, route_tables(new, project.base_dir, project.config)


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


async def reload_topology(reload: Reload, reason: str) -> tuple[dict[str, Any], Project]:
    """One reload: the outcome, and the project the runner now runs (new or unchanged).

    Never raises for bad input: the running topology then stays as it was.
    """
    started = time.monotonic()
    current, running = reload.project, reload.running
    old = running.resolved if running is not None else None
    if running is None or old is None or reload.stopping():
        state = "stopping" if reload.stopping() else "still starting"
        errors = [f"runner is {state}: reload not applied"]
        return _reject(reload, reason, started, errors), current
    try:
        project, new, tables = await asyncio.to_thread(load_again, current, reload.name)
    except ValidationFailed as exc:
        return _reject(reload, reason, started, [str(p) for p in exc.problems]), current
    plan = diff(old, new, current.config, project.config)
    if plan.restart_required:
        return _reject(reload, reason, started, list(plan.restart_required)), current
    if plan.empty:
        result = _record(reload, "unchanged", started, [], [])
        log.info("reload (%s): nothing changed (%.0fms)", reason, result["duration_ms"])
        return result, project
    stopping = ["runner is stopping: reload not applied"]
    if reload.stopping():
        return _reject(reload, reason, started, stopping), current
    try:
        await running.provision(
            plan, new, stopping=reload.stopping, deadline=time.monotonic() + PROVISION_TIMEOUT
        )
    except (*TRANSIENT, ResponseError) as exc:
        if reload.stopping():
            return _reject(reload, reason, started, stopping), current
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
        errors = [f"provisioning failed: {exc}"]
        return _record(reload, "rolled_back", started, [], errors), current
    if reload.stopping():  # stop() began while we provisioned: start nothing now
        return _reject(reload, reason, started, stopping), current
    running.apply(plan, new, tables, runner_interval=project.config.runner.heartbeat_interval)
    apply_settings(project.config)
    if project.config.log.level != current.config.log.level:
        logging.getLogger().setLevel(project.config.log.level.upper())
    lines = [str(c) for c in plan.changes]
    result = _record(reload, "applied", started, lines, [])
    for line in lines:
        log.info("%s", line)
    before = unread_inboxes(old)
    for agent, keys in unread_inboxes(new).items():
        if agent not in before:  # newly unread: a new agent, or its reader removed
            log.warning("%s", no_reader(agent, keys))
    log.info(
        "reload (%s) applied in %.0fms: %d change(s)%s",
        reason,
        result["duration_ms"],
        len(lines),
        _summary(plan),
    )
    return result, project


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
