"""The runner: validate, provision, run every group's consumer, reload, drain.

One :class:`Runner` per process. ``apply`` is the one place that turns a
resolved topology into running consumers; start and every reload go through it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.callpool import THREAD_PREFIX as CALL_THREAD_PREFIX
from cortex_flow.callpool import CallPool, threads_needed
from cortex_flow.connection import describe_url, is_cluster, redis_from_url, wait_for_redis
from cortex_flow.consumer import GroupConsumer, ensure_group
from cortex_flow.errors import CortexFlowError, ValidationFailed
from cortex_flow.gauges import refresh_gauges
from cortex_flow.heartbeat import HeartbeatMonitor, check_runner_name, runner_instance
from cortex_flow.loader import Project, load_project
from cortex_flow.logs import setup_logging
from cortex_flow.routes import RouteTable
from cortex_flow.stats import GroupStats, RunnerStats
from cortex_flow.topology import Resolved, ResolvedGroup, resolve

log = logging.getLogger("cortex_flow.runner")

Watcher = Callable[[], AsyncIterator[Any]]


def route_tables(resolved: Resolved) -> dict[str, RouteTable]:
    """Compile every group's routes (imports ``call`` targets); errors name the route."""
    streams = {n: s.spec for n, s in resolved.streams.items()}
    agents = frozenset(resolved.agents)
    tables, problems = {}, []
    for name, group in resolved.groups.items():
        try:
            tables[name] = RouteTable(group, streams, agents)
        except Exception as exc:  # importing user code can raise anything (SyntaxError, ...)
            origin = resolved.topology.origin("groups", name)
            what = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
            problems.append(origin.problem(("routes",), f"cannot load a call target: {what}"))
    if problems:
        raise ValidationFailed(problems)
    return tables


class Runner:
    """Runs a project's topology against Redis until stopped."""

    def __init__(
        self,
        project: Project,
        *,
        client: Any = None,
        url: str | None = None,
        admin: bool = True,
        watcher: Watcher | None = None,
        block: float = 1.0,
    ) -> None:
        self.project = project
        self.config = project.config
        self.name = self.config.runner.name
        self.url = url or self.config.redis.url
        self.client = client
        self.stats = RunnerStats(runner=self.name)
        self.resolved: Resolved | None = None
        self.consumers: dict[str, GroupConsumer] = {}
        self.tables: dict[str, RouteTable] = {}
        self.block = block
        self._admin_enabled = admin
        self._watcher = watcher
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._embedded: Any = None
        self._admin: Any = None
        self._http: Any = None
        self._heartbeats: HeartbeatMonitor | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._retiring: set[asyncio.Task[bool]] = set()
        self._draining: dict[str, GroupConsumer] = {}  # retired, maybe still finishing
        self.executor = CallPool()  # sized from the topology in start(), grown on reload
        self.instance = runner_instance()  # host:pid:start_ms, in this runner's beats
        if str(project.base_dir) not in sys.path:
            sys.path.insert(0, str(project.base_dir))

    # -- start -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (waiting out an outage), provision, and start every consumer.

        What can refuse to start (the admin port, the runner name) is settled before the
        first consumer starts, so a failed start leaves nothing running.
        """
        self.stats.started_at = time.time()
        self.instance = runner_instance(self.stats.started_at)
        resolved = resolve(self.project.topology, self.name)
        tables = route_tables(resolved)
        await self._start_admin()  # a port in use fails now, not after Redis is reached
        self.executor.grow(threads_needed(resolved, tables))
        if self.client is None:
            if self.url == "embedded":
                from cortex_flow.embedded import resolve_url

                self.url, self._embedded = await asyncio.to_thread(
                    resolve_url, "embedded", self.project.base_dir
                )
                hint = (
                    self._embedded.connect_hint()
                    if self._embedded
                    else f"using the embedded Redis already running at {self.url}"
                )
                # stdout, not the log: it is what a person copies into another terminal
                print(hint, flush=True)
            self.client = redis_from_url(self.url)
        log.info("connecting to Redis at %s", describe_url(self.url) if self.url else "(given)")
        await wait_for_redis(self.client, timeout=None, log=log)
        self.stats.connected = True
        self.cluster = is_cluster(self.client)
        await self._check_name(resolved)
        self._ensure_http(resolved)
        await self._provision(resolved)
        self._heartbeats = HeartbeatMonitor(
            self.client,
            resolved,
            self.stats,
            runner_interval=self.config.runner.heartbeat_interval,
            on_down=self._agent_down,
            log=logging.getLogger("cortex_flow.heartbeat"),
            instance=self.instance,
        )
        await self._heartbeats.start()
        for name in resolved.groups:
            self._start_group(resolved, resolved.groups[name], tables[name])
        self.resolved, self.tables = resolved, tables
        self.stats.provisioned = True
        log.info(
            "running %d group(s) as consumer %s: %s",
            len(self.consumers),
            self.name,
            ", ".join(
                f"{n} ({len(g.keys)} key{'s' if len(g.keys) != 1 else ''})"
                for n, g in resolved.groups.items()
            ),
        )
        if self._watcher is not None or self.config.reload.watch:
            self._tasks.append(asyncio.create_task(self._watch(), name="reload:watch"))

    async def _provision(self, resolved: Resolved) -> None:
        for group in resolved.groups.values():
            for key in group.keys:
                await self._create_group(group, key.key)

    async def _create_group(self, group: ResolvedGroup, key: str) -> None:
        """XGROUP CREATE ... MKSTREAM for one key; errors name the group and key."""
        start = group.spec.start
        try:
            created = await ensure_group(self.client, key, group.name, start)
        except ResponseError as exc:  # e.g. WRONGTYPE: the key holds something else
            raise ResponseError(f"group {group.name} on {key}: {exc}") from exc
        if created:
            log.info("created group %s on %s (from %s)", group.name, key, start)

    def _ensure_http(self, resolved: Resolved) -> None:
        """One HTTP client for every `http` route, made when the first such route appears."""
        if self._http is not None:
            return
        if any(r.http for g in resolved.groups.values() for r in g.spec.routes):
            import aiohttp

            self._http = aiohttp.ClientSession()
            for consumer in self.consumers.values():
                consumer.http = self._http  # a route swap may bring the first http route

    def _start_group(
        self,
        resolved: Resolved,
        group: ResolvedGroup,
        table: RouteTable,
        predecessor: asyncio.Event | None = None,
    ) -> GroupConsumer:
        draining = self._draining.get(group.name)
        if predecessor is None and draining is not None:
            # a group removed and added back: its old consumer (same name) must finish
            # before the new one re-reads the pending entries they share
            predecessor = draining.done
        stats = self.stats.groups.get(group.name) or GroupStats(group.name, group.consumer)
        self.stats.groups[group.name] = stats
        consumer = GroupConsumer(
            self.client,
            group,
            table,
            {n: s.spec for n, s in resolved.streams.items()},
            stats,
            cluster=self.cluster,
            executor=self.executor,
            http=self._http,
            predecessor=predecessor,
            block=self.block,
            log=logging.getLogger("cortex_flow.consumer"),
        )
        consumer.start()
        self.consumers[group.name] = consumer
        return consumer

    def _retire(self, consumer: GroupConsumer) -> None:
        """Stop a replaced or removed consumer in the background; shutdown awaits it."""
        task = asyncio.create_task(consumer.stop(self.config.runner.shutdown_grace))
        self._retiring.add(task)
        self._draining[consumer.name] = consumer

        def finished(task: asyncio.Task[bool]) -> None:
            self._retiring.discard(task)
            if self._draining.get(consumer.name) is consumer:
                del self._draining[consumer.name]

        task.add_done_callback(finished)

    async def _check_name(self, resolved: Resolved) -> None:
        """Refuse to run under a name another live runner beats with (see heartbeat)."""
        key = resolved.heartbeat_key
        if key is None:
            return  # no heartbeat stream: runners cannot see each other
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
            log.warning(
                "cannot read %s to check that no other runner is named %s (%s); starting anyway",
                key,
                self.name,
                exc,
            )

    def _agent_down(self, name: str) -> None:
        for consumer in self.consumers.values():
            consumer.request_claim([name])

    async def _start_admin(self) -> None:
        where = self.config.admin.host_port
        if not self._admin_enabled or where is None:
            return
        from cortex_flow.admin import AdminServer

        admin = AdminServer(
            where[0],
            where[1],
            stats=self.stats,
            ready=self.ready,
            reload=lambda: self.reload("admin endpoint"),
            refresh=self.refresh,
            log=logging.getLogger("cortex_flow.admin"),
            allow_public=self.config.admin.allow_public,
        )
        await admin.start()
        self._admin = admin

    # -- state -------------------------------------------------------------------------

    def ready(self) -> tuple[bool, dict[str, Any]]:
        reload = self.stats.reload
        detail = {
            "runner": self.name,
            "connected": self.stats.connected,
            "provisioned": self.stats.provisioned,
            "draining": self.stats.draining,
            "groups": sorted(self.consumers),
            "reload": {
                "last_outcome": reload.last_outcome,
                "last_at": reload.last_at,
                "errors": reload.last_errors,
                "changes": reload.last_changes,
            },
        }
        ok = self.stats.connected and self.stats.provisioned and not self.stats.draining
        return ok, detail

    async def refresh(self) -> None:
        """Update pending/lag gauges from Redis (before a metrics scrape)."""
        await refresh_gauges(self.client, self.resolved, self.stats)

    # -- reload ------------------------------------------------------------------------

    async def reload(self, reason: str) -> dict[str, Any]:
        """Load and validate everything, then apply only the difference."""
        from cortex_flow.reload import reload_runner

        async with self._reload_lock:
            return await reload_runner(self, reason)

    async def _watch(self) -> None:
        from cortex_flow.reload import watch_changes

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

    # -- stop --------------------------------------------------------------------------

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
        results = await asyncio.gather(
            *(c.stop(grace) for c in self.consumers.values()), *self._retiring
        )
        if self._heartbeats is not None:
            await self._heartbeats.stop()
        if self._admin is not None:
            await self._admin.stop()
        if self._http is not None:
            await self._http.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        self._stopped.set()
        clean = all(results)
        log.info("stopped%s", "" if clean else " (some messages left pending for the next run)")
        return clean


async def run(project: Project) -> int:
    """Run until SIGTERM/SIGINT (drain) or a second signal (force); SIGHUP reloads."""
    runner = Runner(project)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_stop() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("stop requested: finishing in-flight messages (signal again to force)")
            runner.request_stop()
        else:
            log.warning("second signal: exiting now; unfinished messages stay pending")
            raise SystemExit(1)

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
    try:
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
        return 0
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _calls_still_running(wait: float = 0.5) -> bool:
    """True if a sync ``call`` thread outlived the drain (idle workers exit at once)."""
    deadline = time.monotonic() + wait
    for thread in threading.enumerate():
        if thread.name.startswith(CALL_THREAD_PREFIX):
            thread.join(max(0.0, deadline - time.monotonic()))
    return any(
        t.name.startswith(CALL_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate()
    )


def command(args: argparse.Namespace) -> int:
    project = load_project(args.config)
    setup_logging(project.config.log.level, project.config.log.format)
    try:
        code = asyncio.run(run(project))
    except CortexFlowError:
        raise
    except KeyboardInterrupt:
        code = 130
    except SystemExit as exc:  # a second signal: stop now
        code = exc.code if isinstance(exc.code, int) else 1
    if _calls_still_running():
        # Python would wait for the thread at exit, for as long as the call takes. Its
        # message is still pending, so the next consumer gets it: leave now.
        log.warning("a sync call is still running after the drain; exiting without it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


__all__ = ["Path", "Runner", "command", "route_tables", "run"]
