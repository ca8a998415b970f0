"""A group over a partitioned stream: each partition read by one runner at a time.

Each partition's keys share a hash slot, so its consumer waits on them in one blocking
read and commits atomically, wherever the partition lies in a cluster. The runners
that share the flows split the partitions between them by rendezvous hashing over
the runners beating now (:func:`owner`): every runner computes the same split from
the same heartbeats, and a runner joining or leaving moves only its share. So a
partition key's messages (one partition, in publish order) are read by one runner;
with ``concurrency: 1`` they are handled in order too.

A partition changes hands only when nothing of it is pending to its previous runner
(that one finishes and acknowledges what it holds, then stops reading it). A runner
that died holds nothing more once its silence is noticed: its pending entries are
claimed by the new owner. Without heartbeats (no ``heartbeats:`` in the flows) the
runners are unknown, and each runner reads every partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.topology import ResolvedGroup, StreamKey, partitions_of
from cortex_flow.runtime.consumer import GroupConsumer
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.stats import GroupStats

REBALANCE_EVERY = 1.0  # seconds between two looks at who beats (in memory: no command)
HELD_PAGE = 1000  # a previous owner with this many pending entries is taken as busy
# Who reads the group (XINFO CONSUMERS) is looked up when the runners beating change,
# every ROSTER_EVERY s, and every ROSTER_RETRY s while a live runner is not (yet) one.
ROSTER_EVERY = 30.0
ROSTER_RETRY = 3.0

Members = Callable[[], set[str] | None]  # the other runners beating now; None: unknown


def owner(partition: int, runners: Iterable[str]) -> str:
    """The runner that reads ``partition`` (rendezvous hashing: highest score wins)."""
    return max(runners, key=lambda name: (zlib.crc32(f"{name}/{partition}".encode()), name))


class PartitionedConsumer:
    """The consumers of the partitions of one group that this runner owns."""

    def __init__(
        self,
        client: Any,
        group: ResolvedGroup,
        table: RouteTable,
        streams: Mapping[str, StreamSpec],
        stats: GroupStats,
        *,
        members: Members | None = None,
        shutdown_grace: float = 30.0,
        log: logging.Logger | None = None,
        **options: Any,
    ) -> None:
        self.client = client
        self.group = group
        self.name = group.name
        self.keys = list(group.keys)
        self.log = log or logging.getLogger("cortex_flow.consumer")
        self._streams = streams
        self._stats = stats
        self._options = options
        self._table = table
        self._http: Any = options.get("http")
        self._members = members
        self._grace = shutdown_grace
        self._partitions: list[tuple[StreamKey, ...]] = partitions_of(group.keys)
        self.parts: dict[int, GroupConsumer] = {}  # running, by partition index
        self._leaving: dict[int, GroupConsumer] = {}  # handed over, still finishing
        # consumers to claim for, in parts started later, with the min-idle asked (ms)
        self._claims: dict[str, int] = {}
        self._faults: Any = None  # one fault log for the group, not one per partition
        self._roster: set[str] = set()  # consumers of the group, last looked up
        self._roster_live: frozenset[str] = frozenset()  # the runners beating then
        self._roster_at = -ROSTER_EVERY
        self._stopping = False
        self._loop: asyncio.Task[None] | None = None
        self.done = asyncio.Event()  # set when every partition's consumer is done

    # -- what the running topology uses ----------------------------------------------------

    @property
    def table(self) -> RouteTable:
        return self._table

    @property
    def http(self) -> Any:
        return self._http

    @http.setter
    def http(self, http: Any) -> None:
        self._http = http
        for part in self._all():
            part.http = http

    @property
    def held(self) -> int:
        return sum(part.held for part in self._all())

    def owned(self) -> list[int]:
        """The partitions this runner reads now."""
        return sorted(self.parts)

    def start(self) -> asyncio.Task[None]:
        self._loop = asyncio.create_task(self._rebalance(), name=f"partitions:{self.name}")
        return self._loop

    def swap_routes(self, table: RouteTable) -> None:
        self._table = table
        for part in self._all():
            part.swap_routes(table)

    def request_claim(self, consumers: Iterable[str], min_idle: int = 0) -> None:
        names = set(consumers)
        for name in names:  # the smallest min-idle asked for a name holds
            self._claims[name] = min(min_idle, self._claims.get(name, min_idle))
        for part in self.parts.values():
            part.request_claim(names, min_idle)

    async def stop(self, grace: float) -> bool:
        self._stopping = True
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        parts = [*self.parts.values(), *self._leaving.values()]
        results = await asyncio.gather(*(part.stop(grace) for part in parts))
        self.done.set()
        return all(results)

    # -- ownership ---------------------------------------------------------------------------

    def _all(self) -> list[GroupConsumer]:
        return [*self.parts.values(), *self._leaving.values()]

    async def _others(self) -> set[str] | None:
        """The other runners that read this group now: beating (not silent, not stopped)
        and registered as consumers of it (a runner of other flows on the same heartbeat
        stream is not one); None while the runners are unknown."""
        live = self._members() if self._members is not None else set()
        if live is None:
            return None
        if not live:
            return set()
        now = time.monotonic()
        stale = now - self._roster_at >= (ROSTER_RETRY if live - self._roster else ROSTER_EVERY)
        if live != self._roster_live or stale:
            self._roster_live, self._roster_at = frozenset(live), now
            key = self._partitions[0][0].key
            try:
                found = await self.client.xinfo_consumers(key, self.name)
                self._roster = {str(c["name"]) for c in found}
            except ResponseError as exc:  # a server (or fake) without it: all that beat
                self.log.debug("group %s: XINFO CONSUMERS failed (%s)", self.name, exc)
                self._roster = set(live)
        return live & self._roster

    async def _register(self) -> None:
        """Make this runner a consumer of the group (on its first partition's first key),
        so the other runners count it among those that share the partitions."""
        key = self._partitions[0][0].key
        try:
            await self.client.xgroup_createconsumer(key, self.name, self.group.consumer)
        except ResponseError as exc:  # a server (or fake) without it: counted when it reads
            self.log.debug("group %s: XGROUP CREATECONSUMER failed (%s)", self.name, exc)

    async def _rebalance(self) -> None:
        """Start the partitions this runner owns, hand over the ones it no longer does."""
        registered = False
        while not self._stopping:
            try:
                if not registered:
                    await self._register()
                    registered = True
                others = await self._others()
                if others is not None:
                    await self._apply(others)
            except Exception as exc:  # Redis not answering: look again next time
                self.log.debug("group %s: partitions not balanced yet (%s)", self.name, exc)
            await asyncio.sleep(REBALANCE_EVERY)

    async def _apply(self, others: set[str]) -> None:
        me = self.group.consumer
        runners = others | {me}
        mine = {i for i in range(len(self._partitions)) if owner(i, runners) == me}
        for index in sorted(set(self.parts) - mine):
            self._hand_over(index)
        for index in sorted(mine - set(self.parts)):
            if await self._free(index, others):
                self._take(index, others)

    async def _free(self, index: int, others: set[str]) -> bool:
        """Whether no other live runner holds entries of the partition any more.

        Held means renewed lately: a runner renews what it holds every third of
        ``claim_idle``. A failed entry waiting for its retry is not renewed, so it does
        not hold the hand-over up; it is claimed once idle past ``claim_idle``.
        """
        if index in self._leaving and not self._leaving[index].done.is_set():
            return False  # our own previous consumer of it is still finishing
        fresh_ms = int(self.group.spec.retry.claim_idle / 3 * 2000) + 1000
        for key in self._partitions[index]:
            summary = await self.client.xpending(key.key, self.name)
            for row in summary.get("consumers") or []:
                if row["name"] not in others or not int(row["pending"]):
                    continue
                rows = await self.client.xpending_range(
                    key.key, self.name, "-", "+", HELD_PAGE, consumername=row["name"]
                )
                if len(rows) >= HELD_PAGE or any(
                    r["time_since_delivered"] < fresh_ms for r in rows
                ):
                    return False
        return True

    def _make(self, keys: tuple[StreamKey, ...]) -> GroupConsumer:
        return GroupConsumer(
            self.client,
            dataclasses.replace(self.group, keys=keys),
            self._table,
            self._streams,
            self._stats,
            log=self.log,
            **self._options,
        )

    def _take(self, index: int, others: set[str]) -> None:
        leaving = self._leaving.pop(index, None)
        part = self._make(self._partitions[index])
        if leaving is not None:
            part.predecessor = leaving.done
        if self._faults is None:
            self._faults = part.faults
        part.faults = self._faults
        if self._http is not None:
            part.http = self._http
        claims = {n: i for n, i in self._claims.items() if n not in others}  # not beating again
        for name, min_idle in claims.items():
            part.request_claim([name], min_idle)
        part.start()
        self.parts[index] = part
        self.log.info("group %s: reading partition %d (%s)", self.name, index, self._tag(index))

    def _hand_over(self, index: int) -> None:
        part = self.parts.pop(index)
        self._leaving[index] = part
        self.log.info(
            "group %s: partition %d (%s) now belongs to another runner; finishing what this "
            "runner holds of it",
            self.name,
            index,
            self._tag(index),
        )
        task = asyncio.create_task(part.stop(self._grace), name=f"handover:{self.name}:{index}")

        def forget(_: asyncio.Task[bool]) -> None:
            if self._leaving.get(index) is part:
                del self._leaving[index]

        task.add_done_callback(forget)

    def _tag(self, index: int) -> str:
        return self._partitions[index][0].key


Consumer = GroupConsumer | PartitionedConsumer


def make_consumer(
    client: Any,
    group: ResolvedGroup,
    table: RouteTable,
    streams: Mapping[str, StreamSpec],
    stats: GroupStats,
    *,
    members: Members | None = None,
    shutdown_grace: float = 30.0,
    **options: Any,
) -> Consumer:
    """A :class:`PartitionedConsumer` for a group over partitions, else a GroupConsumer."""
    if any(k.partition is not None for k in group.keys):
        return PartitionedConsumer(
            client,
            group,
            table,
            streams,
            stats,
            members=members,
            shutdown_grace=shutdown_grace,
            **options,
        )
    return GroupConsumer(client, group, table, streams, stats, **options)
