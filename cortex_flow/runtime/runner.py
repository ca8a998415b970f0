"""The runner: validate, provision, run every group's consumer, reload, drain.

One :class:`Runner` per process. It connects, settles what can refuse a start (the admin
port, the runner name), and hands every change of topology, the first one included, to
:meth:`RunningTopology.apply <cortex_flow.runtime.running.RunningTopology.apply>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.exposed import topology_doc
from cortex_flow.flow.loader import Project
from cortex_flow.flow.plan import diff
from cortex_flow.flow.topology import Resolved, no_reader, resolve, unread_inboxes
from cortex_flow.runtime import tracing
from cortex_flow.runtime.callpool import CallPool
from cortex_flow.runtime.flowmetrics import flow_detail
from cortex_flow.runtime.gauges import refresh_gauges
from cortex_flow.runtime.heartbeat import HeartbeatMonitor, check_runner_name, runner_instance
from cortex_flow.runtime.partitioned import Consumer
from cortex_flow.runtime.reload import Reload, reload_topology, watch_changes
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.running import (
    RunningTopology,
    apply_settings,
    refuse_wrong_types,
    route_tables,
)
from cortex_flow.runtime.stats import RunnerStats
from cortex_flow.wire.connection import (
    describe_error,
    describe_url,
    is_cluster,
    redis_from_url,
    wait_for_redis,
)
from cortex_flow.wire.redis_errors import explain, redis_user

log = logging.getLogger("cortex_flow.runner")

PROBE_EVERY = 5.0  # seconds between two PINGs of the connection probe while Redis answers
PROBE_EVERY_DOWN = 1.0  # ... and while it does not: "answers again" is seen within a second
PROBE_TIMEOUT = 2.0  # a PING unanswered this long counts as Redis down

Watcher = Callable[[], AsyncIterator[Any]]


class ForcedStop(Exception):
    """A second stop signal: the runner left without finishing in-flight messages."""


class Runner:
    """Runs a project's topology against Redis until stopped.

    ``client`` is a Redis client to use (else one is made from ``url`` or the config);
    ``http`` stands in for the HTTP client of ``http`` routes (a test stub);
    ``announce`` receives the line that tells other processes how to reach an embedded
    server (the CLI prints it; the default logs it); ``ui`` makes what mounts extra routes
    on the admin endpoint from the runner (the CLI's dashboard, :mod:`cortex_flow.ops.dashboard`).
    """

    def __init__(
        self,
        project: Project,
        *,
        client: Any = None,
        url: str | None = None,
        admin: bool = True,
        watcher: Watcher | None = None,
        block: float = 1.0,
        http: Any = None,
        announce: Callable[[str], None] | None = None,
        ui: Callable[[Runner], Callable[[Any], None]] | None = None,
    ) -> None:
        self.project = project
        self.config = project.config
        self.name = self.config.runner.name
        self.url = url or self.config.redis.url
        self.client = client
        self.stats = RunnerStats(runner=self.name)
        self.block = block
        self.executor = CallPool()  # sized from the topology in apply(), grown on reload
        self.instance = runner_instance()  # host:pid:start_ms, in this runner's beats
        self.running: RunningTopology | None = None
        self.cluster = False
        self.admin: Any = None  # the AdminServer once started
        self._http = http
        self._announce = announce or log.info
        self._admin_enabled = admin
        self._ui = ui
        self._watcher = watcher
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._embedded: Any = None
        self._tasks: list[asyncio.Task[Any]] = []

    # -- what runs now ---------------------------------------------------------------------

    @property
    def consumers(self) -> dict[str, Consumer]:
        """The running consumers by group name."""
        return self.running.consumers if self.running is not None else {}

    @property
    def resolved(self) -> Resolved | None:
        """The topology that runs now (None before start)."""
        return self.running.resolved if self.running is not None else None

    @property
    def tables(self) -> dict[str, RouteTable]:
        return self.running.tables if self.running is not None else {}

    @property
    def heartbeats(self) -> HeartbeatMonitor | None:
        return self.running.heartbeats if self.running is not None else None

    # -- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (waiting out an outage), provision, and start every consumer.

        What can refuse to start (the admin port, the runner name) is settled before the
        first consumer starts, so a failed start leaves nothing running.
        """
        self.stats.started_at = time.time()
        self.instance = runner_instance(self.stats.started_at)
        resolved = resolve(self.project.topology, self.name)
        tables = route_tables(resolved, self.project.base_dir, self.config)
        apply_settings(self.config)
        tracing.setup()  # once, before any consumer: off unless OTEL_* ask for traces
        await self._start_admin()  # a port in use fails now, not after Redis is reached
        if self.client is None:
            if self.url == "embedded":
                await self._start_embedded()
            try:
                self.client = redis_from_url(self.url)
            except ValueError as exc:  # given as Runner(url=...): config.yaml is checked
                raise CortexFlowError(f"redis.url: {exc}") from None
        log.info("connecting to Redis at %s", describe_url(self.url) if self.url else "(given)")
        await wait_for_redis(self.client, timeout=None, log=log)
        self.stats.connected = True
        self.cluster = is_cluster(self.client)
        await self._check_name(resolved)
        await refuse_wrong_types(self.client, resolved)  # before anything is created
        running = RunningTopology(
            self.client,
            self.stats,
            cluster=self.cluster,
            shutdown_grace=self.config.runner.shutdown_grace,
            block=self.block,
            http=self._http,
            executor=self.executor,
        )
        plan = diff(None, resolved)  # from nothing: every group is an add
        await running.provision(plan, resolved, stopping=lambda: self.stopping)
        await running.watch_heartbeats(
            resolved, settings=self.config.runner, instance=self.instance
        )
        self.running = running
        running.apply(plan, resolved, tables)
        self.stats.provisioned = True
        log.info(
            "running %d group(s) as consumer %s: %s",
            len(running.consumers),
            self.name,
            ", ".join(
                f"{n} ({len(g.keys)} key{'s' if len(g.keys) != 1 else ''})"
                for n, g in resolved.groups.items()
                if g.by_runner
            ),
        )
        for agent, keys in unread_inboxes(resolved).items():
            log.warning("%s", no_reader(agent, keys))
        if self._watcher is not None or self.config.reload.watch:
            self._tasks.append(asyncio.create_task(self._watch(), name="reload:watch"))
        self._tasks.append(asyncio.create_task(self._probe(), name="redis:probe"))

    async def _probe(self) -> None:
        """PING Redis every ``PROBE_EVERY`` (every ``PROBE_EVERY_DOWN`` while it is down):
        ``connected`` (the gauge, ``/readyz``) is false while it does not answer within
        ``PROBE_TIMEOUT``, and the log says so."""
        where = describe_url(self.url) if self.url else "(given client)"
        down_since: float | None = None
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self.client.ping(), PROBE_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    why = explain(exc, user=redis_user(self.client))
                    log.warning(
                        "Redis at %s does not answer (%s); not ready until it does. Consumers "
                        "keep what they hold and go on once it answers",
                        where,
                        why or describe_error(exc),
                    )
                self.stats.connected = False
            else:
                if down_since is not None:
                    log.info(
                        "Redis at %s answers again (after %.1fs)",
                        where,
                        time.monotonic() - down_since,
                    )
                    down_since = None
                self.stats.connected = True
            with contextlib.suppress(TimeoutError):
                every = PROBE_EVERY if down_since is None else PROBE_EVERY_DOWN
                await asyncio.wait_for(self._stop.wait(), every)

    async def _start_embedded(self) -> None:
        from cortex_flow.wire.embedded import resolve_url

        self.url, self._embedded = await asyncio.to_thread(
            resolve_url, "embedded", self.project.base_dir
        )
        self._announce(
            self._embedded.connect_hint()
            if self._embedded
            else f"using the embedded Redis already running at {self.url}"
        )

    async def _check_name(self, resolved: Resolved) -> None:
        """Refuse to run under a name another live runner beats with (see heartbeat)."""
        key = resolved.runner_key
        heartbeats = resolved.topology.heartbeats
        codec = resolved.topology.streams[heartbeats.stream].codec if heartbeats else "raw"
        try:
            await check_runner_name(
                self.client,
                key,
                name=self.name,
                instance=self.instance,
                interval=self.config.runner.heartbeat_interval,
                codec=codec,
            )
        except CortexFlowError:
            raise
        except Exception as exc:  # e.g. the key holds something else: the watch says so too
            why = explain(exc, user=redis_user(self.client), keys=[key])
            log.warning(
                "cannot read %s to check that no other runner is named %s (%s); starting anyway",
                key,
                self.name,
                why or exc,
            )

    async def _start_admin(self) -> None:
        where = self.config.admin.host_port
        if not self._admin_enabled or where is None:
            return
        from cortex_flow.runtime.admin import AdminServer

        admin = AdminServer(
            where[0],
            where[1],
            stats=self.stats,
            ready=self.ready,
            reload=lambda: self.reload("admin endpoint"),
            refresh=self.refresh,
            log=logging.getLogger("cortex_flow.admin"),
            allow_public=self.config.admin.allow_public,
            topology=self.describe,
            # read per request: a reload may change them
            hosts=lambda: self.config.admin.hosts,
            token=lambda: self.config.admin.token,
            extend=self._ui(self) if self._ui is not None else None,
        )
        await admin.start()
        self.admin = admin

    # -- state -----------------------------------------------------------------------------

    def problems(self) -> tuple[list[str], bool]:
        """What Redis refuses the running groups (ACL, credentials, TLS, DNS), one line
        each, and whether a group is blocked by it (then the runner is not ready)."""
        lines, blocked = [], False
        for name in sorted(self.consumers):
            found = self.stats.groups.get(name)
            for area, text in sorted(found.problems.items()) if found else ():
                lines.append(f"group {name}: {text}")
                blocked = blocked or area == "blocked"
        return lines, blocked

    def ready(self) -> tuple[bool, dict[str, Any]]:
        reload = self.stats.reload
        problems, blocked = self.problems()
        detail = {
            "runner": self.name,
            "connected": self.stats.connected,
            "provisioned": self.stats.provisioned,
            "draining": self.stats.draining,
            "groups": sorted(self.consumers),
            "problems": problems,
            "flow": flow_detail(self.stats),
            # groups with sync calls stuck past their timeout (status shows them)
            "stuck_calls": {
                name: {
                    "stuck": g.overrunning,
                    "max_stuck_calls": g.max_stuck_calls,
                    "held_back": g.held_back,
                }
                for name, g in sorted(self.stats.groups.items())
                if g.overrunning
            },
            "reload": {
                "last_outcome": reload.last_outcome,
                "last_at": reload.last_at,
                "errors": reload.last_errors,
                "changes": reload.last_changes,
            },
        }
        ok = self.stats.connected and self.stats.provisioned and not self.stats.draining
        return ok and not blocked, detail

    def describe(self) -> dict[str, Any] | None:
        """What ``GET /topology`` serves: the flows and settings that run now (redacted)."""
        resolved = self.resolved
        if resolved is None:
            return None
        return topology_doc(resolved.topology, self.config, self.name)

    async def refresh(self) -> None:
        """Update pending/lag gauges from Redis (before a metrics scrape)."""
        await refresh_gauges(self.client, self.resolved, self.stats)

    # -- reload ----------------------------------------------------------------------------

    async def reload(self, reason: str) -> dict[str, Any]:
        """Load and validate everything, then apply only the difference."""
        async with self._reload_lock:
            request = Reload(
                self.running, self.project, self.name, self.stats.reload, lambda: self.stopping
            )
            result, project = await reload_topology(request, reason)
            self.project, self.config = project, project.config
            return result

    async def _watch(self) -> None:
        while not self._stop.is_set():
            debounce = self.config.reload.debounce
            source = self._watcher() if self._watcher else watch_changes(self.project, self._stop)
            try:
                async for _ in source:
                    if self._stop.is_set():
                        return
                    try:
                        await self.reload("file change")
                    except Exception:  # the watcher must outlive one failed reload
                        log.exception("reload after a file change failed; still watching")
                    if self._watcher is None and self.config.reload.debounce != debounce:
                        break  # watch again with the new debounce
                else:
                    return
            finally:
                close = getattr(source, "aclose", None)
                if close is not None:
                    await close()

    # -- stop ------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once a stop was requested: reloads are refused from then on."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self, grace: float | None = None) -> bool:
        """Stop reading, finish and acknowledge in-flight work, close everything."""
        grace = self.config.runner.shutdown_grace if grace is None else grace
        self._stop.set()
        self.stats.draining = True
        for task in self._tasks:
            task.cancel()
        log.info("draining %d group(s) (up to %gs)", len(self.consumers), grace)
        clean = True
        if self.running is not None:
            clean = await self.running.stop(grace)
        else:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self.admin is not None:
            await self.admin.stop()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        log.info("stopped%s", "" if clean else " (some messages left pending for the next run)")
        return clean


async def serve(runner: Runner) -> None:
    """Run until SIGTERM/SIGINT (drain) or a second signal (:class:`ForcedStop`); SIGHUP
    reloads. The signal handlers are removed again on the way out."""
    loop = asyncio.get_running_loop()
    signals = 0
    forced = asyncio.Event()

    def on_stop() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("stop requested: finishing in-flight messages (signal again to force)")
            runner.request_stop()
        else:
            log.warning("second signal: exiting now; unfinished messages stay pending")
            forced.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
        installed.append(sig)
    reloads: set[asyncio.Task[Any]] = set()  # keep a reference until each one is done

    def on_hup() -> None:
        task = asyncio.ensure_future(runner.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    installed.append(signal.SIGHUP)
    force = asyncio.create_task(forced.wait())
    try:
        work = asyncio.create_task(_serve(runner))
        await asyncio.wait({work, force}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise ForcedStop("stopped by a second signal; unfinished messages stay pending")
        work.result()
    finally:
        force.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _serve(runner: Runner) -> None:
    start = asyncio.create_task(runner.start())
    stop = asyncio.create_task(runner.wait())
    await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
    if start.done():
        if start.exception() is not None:
            stop.cancel()
            # what started before the failure (admin, Redis client, embedded server,
            # threads) must end, or the process would hang on its way out
            try:
                await runner.stop()
            except Exception:
                log.exception("stopping after a failed start failed too")
            start.result()  # raises: the CLI prints the error and exits 1
        await stop
    else:
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
    await runner.stop()


__all__ = ["ForcedStop", "Runner", "serve"]
