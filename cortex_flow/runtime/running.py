"""The running topology: the one object that owns the consumers, and its one ``apply``.

Start and reload both go through :meth:`RunningTopology.apply`: start applies the plan
from nothing (``plan.diff(None, resolved)``: every group an add), a reload applies the
plan from the running topology. Applying is make-before-break: a changed group's new
consumer (same consumer name) starts before the old one is told to stop, and re-reads
its pending entries only once the old one has finished and acknowledged what it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import NoPermissionError, RedisError, ResponseError

from cortex_flow.errors import CortexFlowError, ValidationFailed
from cortex_flow.flow.callables import importable_from
from cortex_flow.flow.calltargets import refused_object
from cortex_flow.flow.config import Config, RunnerSettings
from cortex_flow.flow.limits import set_limits
from cortex_flow.flow.outbound import OutboundPolicy, set_policy
from cortex_flow.flow.plan import Plan, declared_keys
from cortex_flow.flow.topology import Resolved, ResolvedGroup, wrong_type_problem
from cortex_flow.runtime.callpool import CallPool, threads_needed
from cortex_flow.runtime.consumer import GroupConsumer
from cortex_flow.runtime.deadconsumers import DeadConsumers
from cortex_flow.runtime.delayed import INTERVAL as DELAYED_INTERVAL
from cortex_flow.runtime.delayed import DelayedMover
from cortex_flow.runtime.delivery import TRANSIENT
from cortex_flow.runtime.duties import (
    AGENTS_DUTY,
    CONSUMERS_DUTY,
    DELAYED_DUTY,
    DUTIES,
    RETENTION_DUTY,
    Duties,
)
from cortex_flow.runtime.faultlog import WHAT
from cortex_flow.runtime.flowgate import FlowGate
from cortex_flow.runtime.heartbeat import HeartbeatMonitor
from cortex_flow.runtime.partitioned import Consumer, make_consumer
from cortex_flow.runtime.retention import RetentionDuty
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.stats import GroupStats, RunnerStats
from cortex_flow.wire.connection import Backoff
from cortex_flow.wire.faults import CLUSTER_ERRORS, passing_reason
from cortex_flow.wire.groups import ensure_group, wrong_types
from cortex_flow.wire.redis_errors import explain, redis_user

log = logging.getLogger("cortex_flow.runner")


def route_tables(
    resolved: Resolved, base_dir: Path | None = None, config: Config | None = None
) -> dict[str, RouteTable]:
    """Compile every group's routes; errors name the route.

    ``call`` targets are imported from the installed packages and from ``base_dir`` (the
    folder that holds config.yaml), and refused when the module they come from is
    (``calls.allow`` of ``config`` lets module prefixes through).
    """
    with contextlib.nullcontext() if base_dir is None else importable_from(base_dir):
        tables = _compile(resolved)
    allow = config.calls.allow if config is not None else []
    problems = [
        resolved.topology.origin("groups", name).problem(("routes", route.index, "call"), why)
        for name, table in tables.items()
        for route in table.routes
        if route.fn is not None and route.route.call is not None
        for why in [refused_object(route.route.call.function, route.fn, allow)]
        if why is not None
    ]
    if problems:
        raise ValidationFailed(problems)
    return tables


def apply_settings(config: Config) -> None:
    """The process-wide settings of a config: template bounds and the outbound policy."""
    set_limits(config.templates.limits())
    set_policy(OutboundPolicy(tuple(config.http.allow)))


async def refuse_wrong_types(client: Any, resolved: Resolved) -> None:
    """Raise one line per declared key that holds something other than a stream.

    Called before the first group is created, so a start that cannot work leaves Redis
    as it was (XGROUP CREATE on such a key would fail half-way with WRONGTYPE).
    """
    found = await wrong_types(client, declared_keys(resolved))
    if found:
        lines = [wrong_type_problem(resolved, key, held) for key, held in found.items()]
        raise CortexFlowError("\n".join(lines))


def _compile(resolved: Resolved) -> dict[str, RouteTable]:
    streams = {n: s.spec for n, s in resolved.streams.items()}
    agents = frozenset(resolved.agents)
    tables, problems = {}, []
    for name, group in resolved.groups.items():
        if not group.by_runner:
            continue  # an agent's own client reads it (agents.X.inbox)
        try:
            tables[name] = RouteTable(group, streams, agents)
        except Exception as exc:  # importing user code can raise anything (SyntaxError, ...)
            origin = resolved.topology.origin("groups", name)
            what = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
            problems.append(origin.problem(("routes",), f"cannot load a call target: {what}"))
    if problems:
        raise ValidationFailed(problems)
    return tables


class RunningTopology:
    """The consumers running for one resolved topology, and what they share.

    ``http`` is the client every ``http`` route uses; given (a test stub) it is never
    replaced or closed here, otherwise one aiohttp session is made when the first
    ``http`` route appears.
    """

    def __init__(
        self,
        client: Any,
        stats: RunnerStats,
        *,
        cluster: bool,
        shutdown_grace: float,
        block: float = 1.0,
        http: Any = None,
        executor: CallPool | None = None,
    ) -> None:
        self.client = client
        self.stats = stats
        self.cluster = cluster
        self.shutdown_grace = shutdown_grace
        self.block = block
        self.http = http
        self._own_http = http is None
        self.executor = executor or CallPool()
        self.resolved: Resolved | None = None
        self.tables: dict[str, RouteTable] = {}
        self.consumers: dict[str, Consumer] = {}
        self.heartbeats: HeartbeatMonitor | None = None
        self.duties: Duties | None = None
        self.retention: RetentionDuty | None = None
        self.dead_consumers: DeadConsumers | None = None
        self.delayed: DelayedMover | None = None
        self.retiring: set[asyncio.Task[bool]] = set()
        self.draining: dict[str, Consumer] = {}  # retired, maybe still finishing

    # -- provisioning (awaits; nothing running changes) ------------------------------------

    async def provision(
        self,
        plan: Plan,
        target: Resolved,
        *,
        stopping: Callable[[], bool] = lambda: False,
        deadline: float | None = None,
    ) -> None:
        """XGROUP CREATE ... MKSTREAM for every key of the groups the plan (re)starts.

        A passing refusal (no answer, out of memory, read-only, loading) is waited out
        with backoff until ``deadline`` (monotonic; None: for as long as it takes) or
        until ``stopping()``; then, and for any other error, it is raised.
        """
        backoff = Backoff(initial=0.05, maximum=1.0)
        while True:
            try:
                for name in (*plan.groups_to_add, *plan.groups_to_restart):
                    group = target.groups[name]
                    for key in group.keys:
                        await self.create_group(group, key.key)
                return
            except (*TRANSIENT, *CLUSTER_ERRORS, ResponseError) as exc:
                reason = passing_reason(exc)
                delay = backoff.next_delay()
                late = deadline is not None and time.monotonic() + delay > deadline
                if reason is None or late or stopping():
                    raise
                if reason == "unreachable":
                    why = "cannot reach Redis to create groups"
                else:
                    why = f"cannot create groups yet: {WHAT.get(reason, reason)}"
                log.warning("%s (%s); retrying in %.1fs", why, exc, delay)
                await asyncio.sleep(delay)

    async def create_group(self, group: ResolvedGroup, key: str) -> None:
        """Create one group on one key; errors name the group and key."""
        start = group.spec.start
        try:
            created = await ensure_group(self.client, key, group.name, start)
        except NoPermissionError as exc:
            # least privilege: an administrator may have created the group; if not, its
            # consumer reports it blocked (status, /readyz) until it can, other groups run
            why = explain(exc, user=redis_user(self.client), command="XGROUP CREATE", keys=[key])
            if not await _group_exists(self.client, key, group.name):
                log.error(
                    "group %s on %s cannot be created: %s; the group waits for it, the others run",
                    group.name,
                    key,
                    why,
                )
            return
        except ResponseError as exc:  # e.g. WRONGTYPE: the key holds something else
            raise ResponseError(f"group {group.name} on {key}: {exc}") from exc
        if created:
            log.info("created group %s on %s (from %s)", group.name, key, start)

    # -- apply (no awaits: a plan is applied whole or not at all) --------------------------

    def apply(
        self,
        plan: Plan,
        target: Resolved,
        tables: dict[str, RouteTable],
        *,
        runner_interval: float | None = None,
    ) -> None:
        """Start, swap and retire consumers so that ``target`` runs; untouched ones stay."""
        if self.executor.grow(threads_needed(target, tables)) and self.resolved is not None:
            log.info("sync calls now run in a pool of %d threads", self.executor.threads)
        self._ensure_http(target)
        # groups an agent's client reads (agents.X.inbox) are provisioned, never consumed
        for name in plan.groups_to_add:
            if target.groups[name].by_runner:
                self._start(target, target.groups[name], tables[name])
        for name in plan.groups_to_restart:
            old = self.consumers.pop(name, None)
            if target.groups[name].by_runner:
                done = old.done if old is not None else None
                self._start(target, target.groups[name], tables[name], predecessor=done)
            if old is not None:
                self._retire(old)
        for name in plan.groups_to_remove:
            if name in self.consumers:
                self._retire(self.consumers.pop(name))
            self.stats.groups.pop(name, None)
        for name in plan.groups_routes_only:
            if name in self.consumers:
                self.consumers[name].swap_routes(tables[name])
        if self.heartbeats is not None:
            if runner_interval is not None:
                self.heartbeats.runner_interval = runner_interval
            if self.heartbeats.update(target):  # a new key: beat and watch moved there
                log.info("heartbeats: now on %s", target.runner_key)
        if self.retention is not None:
            self.retention.resolved = target
        if self.dead_consumers is not None:
            self.dead_consumers.resolved = target
        if self.delayed is not None:
            self.delayed.resolved = target
        if self.duties is not None:
            for duty in DUTIES:
                self.duties.rekey(duty, target.duty_key(duty))
        self.resolved, self.tables = target, tables

    def _ensure_http(self, resolved: Resolved) -> None:
        if self.http is not None:
            return
        if any(r.outbound for g in resolved.groups.values() for r in g.spec.routes):
            from cortex_flow.runtime.outbound import session

            self.http = session()
            for consumer in self.consumers.values():
                consumer.http = self.http  # a route swap may bring the first http route

    def _start(
        self,
        resolved: Resolved,
        group: ResolvedGroup,
        table: RouteTable,
        predecessor: asyncio.Event | None = None,
    ) -> None:
        draining = self.draining.get(group.name)
        if predecessor is None and draining is not None:
            # a group removed and added back: its old consumer (same name) must finish
            # before the new one re-reads the pending entries they share
            predecessor = draining.done
        stats = self.stats.groups.get(group.name) or GroupStats(group.name, group.consumer)
        self.stats.groups[group.name] = stats
        consumer = make_consumer(
            self.client,
            group,
            table,
            {n: s.spec for n, s in resolved.streams.items()},
            stats,
            cluster=self.cluster,
            executor=self.executor,
            http=self.http,
            predecessor=predecessor,
            block=self.block,
            log=logging.getLogger("cortex_flow.consumer"),
            members=self._live_runners,
            shutdown_grace=self.shutdown_grace,
        )
        if FlowGate.wanted(group) and isinstance(consumer, GroupConsumer):
            consumer.gate = FlowGate(
                self.client,
                group,
                resolved.namespace,
                resolved.streams[group.stream].spec.codec,
                stopping=consumer.stopping,
                release=consumer.released,
                on_error=consumer.gate_failed,
                log=logging.getLogger("cortex_flow.flowcontrol"),
            )
            stats.flow = consumer.gate.stats
        consumer.start()
        self.consumers[group.name] = consumer

    def _live_runners(self) -> set[str] | None:
        """The other runners beating now, for partitioned groups to split partitions by;
        an empty set without heartbeats (then each runner reads every partition)."""
        monitor = self.heartbeats
        if monitor is None or monitor.key is None:
            return set()
        return monitor.live_runners()

    def _retire(self, consumer: Consumer) -> None:
        """Stop a replaced or removed consumer in the background; ``stop`` awaits it."""
        task = asyncio.create_task(consumer.stop(self.shutdown_grace))
        self.retiring.add(task)
        self.draining[consumer.name] = consumer

        def finished(task: asyncio.Task[bool]) -> None:
            self.retiring.discard(task)
            if self.draining.get(consumer.name) is consumer:
                del self.draining[consumer.name]

        task.add_done_callback(finished)

    # -- heartbeats ------------------------------------------------------------------------

    async def watch_heartbeats(
        self, resolved: Resolved, *, settings: RunnerSettings, instance: str
    ) -> None:
        """Start the runner's beat, the watch over agents and runners (a silent one is
        claimed for), and this runner's part in the duties (agent events, retention,
        dead consumers), each held by one runner at a time."""
        self.duties = Duties(
            self.client,
            holder=instance,
            lease=settings.duty_lease,
            log=logging.getLogger("cortex_flow.duties"),
        )
        self.heartbeats = HeartbeatMonitor(
            self.client,
            resolved,
            self.stats,
            runner_interval=settings.heartbeat_interval,
            on_down=self.claim_for,
            log=logging.getLogger("cortex_flow.heartbeat"),
            instance=instance,
            duties=self.duties,
        )
        self.retention = RetentionDuty(
            self.client, resolved, self.stats, logging.getLogger("cortex_flow.retention")
        )
        self.dead_consumers = DeadConsumers(
            self.client,
            resolved,
            idle=settings.dead_consumer_idle,
            live=self._live_names,
            claim=self._claim_in,
            log=logging.getLogger("cortex_flow.duties"),
        )
        monitor = self.heartbeats
        self.duties.add(
            AGENTS_DUTY, resolved.duty_key(AGENTS_DUTY), on_change=monitor.events.duty_changed
        )
        self.duties.add(
            RETENTION_DUTY,
            resolved.duty_key(RETENTION_DUTY),
            interval=settings.retention_interval,
            act=self.retention.run,
        )
        self.duties.add(
            CONSUMERS_DUTY,
            resolved.duty_key(CONSUMERS_DUTY),
            interval=min(60.0, max(1.0, settings.dead_consumer_idle / 4)),
            act=self.dead_consumers.run,
        )
        self.delayed = DelayedMover(self.client, resolved, logging.getLogger("cortex_flow.delayed"))
        self.duties.add(
            DELAYED_DUTY,
            resolved.duty_key(DELAYED_DUTY),
            interval=DELAYED_INTERVAL,
            act=self.delayed.run,
        )
        await self.duties.start()
        await self.heartbeats.start()

    def _live_names(self) -> set[str]:
        """Consumer names in use now: runners that beat, agents that are up."""
        monitor = self.heartbeats
        if monitor is None:
            return set()
        live = {a.name for a in self.stats.agents.values() if a.up is not False}
        return live | set(monitor.runners)

    def claim_for(self, name: str, min_idle: int = 0) -> None:
        """An agent or runner went down: every group claims its consumers' entries now,
        those idle at least ``min_idle`` ms (so two runners never claim one entry)."""
        for consumer in self.consumers.values():
            consumer.request_claim([name], min_idle)

    def _claim_in(self, group: str, name: str, min_idle: int) -> None:
        consumer = self.consumers.get(group)
        if consumer is not None:
            consumer.request_claim([name], min_idle)

    # -- stop ------------------------------------------------------------------------------

    async def stop(self, grace: float) -> bool:
        """Drain every consumer (and those still retiring); True if none left work pending."""
        results = await asyncio.gather(
            *(c.stop(grace) for c in self.consumers.values()), *self.retiring
        )
        if self.heartbeats is not None:
            await self.heartbeats.stop()
        if self.duties is not None:
            await self.duties.stop()
        if self.http is not None and self._own_http:
            await self.http.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        return all(results)


async def _group_exists(client: Any, key: str, group: str) -> bool:
    """Whether ``group`` exists on ``key``; False when XINFO GROUPS is refused too."""
    try:
        found = await client.xinfo_groups(key)
    except RedisError:
        return False
    return any(g.get("name") == group for g in found)
