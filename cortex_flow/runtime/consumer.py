"""One consumer of one group: read, route, acknowledge; retry, claim, dead-letter.

Delivery rules (see SPEC "Delivery semantics"):

- An entry is acknowledged only after its routes finished; publishes and the
  XACK go in one MULTI/EXEC when their keys share a slot (always, on a single
  server), else publish first and acknowledge after.
- A failure leaves the entry pending; it is claimed back (XCLAIM) once its
  idle time passes the backoff for its delivery count. At ``max_deliveries``
  it goes to the dead-letter stream, atomically with its XACK.
- Entries idle past ``claim_idle`` in any consumer are claimed (XPENDING IDLE, XCLAIM).
- On start (and after a lost connection) the consumer first takes back its own
  pending entries, a page at a time as slots free up, then reads new ones (``>``).

:class:`GroupConsumer` is the orchestration: its main loop, its concurrency and
its backlog. It composes a :class:`~cortex_flow.runtime.reader.GroupReader` (new entries), an
:class:`~cortex_flow.runtime.handling.EntryHandler` (one entry to an outcome), a
:class:`~cortex_flow.runtime.commit.Committer` (outcomes to Redis) and a
:class:`~cortex_flow.runtime.pending.PendingWork` (retries and claims).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.topology import ResolvedGroup
from cortex_flow.runtime.commit import Committer
from cortex_flow.runtime.delivery import ACK, DEAD, RETRY, TRANSIENT, Entry, Outcome
from cortex_flow.runtime.handling import EntryHandler
from cortex_flow.runtime.pending import PendingWork
from cortex_flow.runtime.reader import FIND_FIRST, GroupReader
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.stats import GroupStats, KeyStats
from cortex_flow.wire.connection import Backoff

__all__ = [
    "ACK",
    "DEAD",
    "FIND_FIRST",
    "RETRY",
    "TRANSIENT",
    "Entry",
    "GroupConsumer",
    "Outcome",
    "ensure_group",
]


async def ensure_group(client: Any, key: str, group: str, start: str) -> bool:
    """XGROUP CREATE ... MKSTREAM; True if created. Only BUSYGROUP is tolerated."""
    try:
        await client.xgroup_create(
            key, group, id="0" if start == "earliest" else "$", mkstream=True
        )
        return True
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise


class GroupConsumer:
    """Runs one Redis consumer (``runner.name``) of one group over all the group's keys."""

    def __init__(
        self,
        client: Any,
        group: ResolvedGroup,
        table: RouteTable,
        streams: Mapping[str, StreamSpec],
        stats: GroupStats,
        *,
        cluster: bool = False,
        executor: Any = None,
        http: Any = None,
        predecessor: asyncio.Event | None = None,
        block: float = 1.0,
        log: logging.Logger | None = None,
    ) -> None:
        self.client = client
        self.group = group
        self.stats = stats
        self.name = group.name
        self.me = group.consumer
        self.spec = group.spec
        self.keys = list(group.keys)
        self.cluster = cluster
        self.predecessor = predecessor
        self.done = asyncio.Event()  # set when stopped with nothing of ours in flight
        self.log = log or logging.getLogger("cortex_flow.consumer")
        retry = self.spec.retry
        self.block_ms = max(10, int(min(block, retry.backoff.initial) * 1000))
        self._claim_every = max(retry.claim_idle / 4, 0.05)
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._inflight: set[tuple[str, str]] = set()
        # failed for good with no dead_letter: left pending, no longer claimed
        self._stuck: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # claimed or re-read entries beyond `concurrency`: in flight for us, not started yet
        self._backlog: deque[Entry] = deque()
        self._key_stats: dict[str, KeyStats] = {k.key: stats.key(k.key) for k in self.keys}
        self.reader = GroupReader(
            client, group, block_ms=self.block_ms, cluster=cluster, sleep=self._sleep, log=self.log
        )
        codec = streams[group.stream].codec
        self.handler = EntryHandler(
            group, table, codec, self._key_stats, executor=executor, http=http, log=self.log
        )
        self.committer = Committer(
            client,
            group,
            streams,
            self._key_stats,
            cluster=cluster,
            log=self.log,
            stuck=self._stuck,
        )
        self.pending = PendingWork(
            client,
            group,
            self._key_stats,
            inflight=self._inflight,
            capacity=self._capacity,
            dispatch=self._dispatch,
            commit=self.committer.commit,
            log=self.log,
            stuck=self._stuck,
        )
        # bound once: the hot path calls these per message (or per batch)
        self._fetch = self.reader.fetch
        self._handle = self.handler.handle
        self._commit = self.committer.commit
        self._task: asyncio.Task[None] | None = None

    # The handler's. A route-only reload swaps the table (swap_routes); the runner may
    # bring the first HTTP client (a reload adding an http route) or a test stub.

    @property
    def table(self) -> RouteTable:
        return self.handler.table

    @property
    def http(self) -> Any:
        return self.handler.http

    @http.setter
    def http(self, http: Any) -> None:
        self.handler.http = http

    @property
    def executor(self) -> Any:
        return self.handler.executor

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"consumer:{self.name}")
        return self._task

    def swap_routes(self, table: RouteTable) -> None:
        """Replace the route table between two messages (a route-only reload)."""
        self.handler.table = table

    def request_claim(self, consumers: Iterable[str]) -> None:
        """Take over another consumer's pending entries now (its agent went down)."""
        self.pending.request_claim(consumers)
        self._wake.set()

    async def stop(self, grace: float) -> bool:
        """Stop reading, finish and acknowledge what is in flight; False if grace ran out."""
        self._stopping.set()
        self._wake.set()
        if self._task is None:
            self.done.set()
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
            return True
        except TimeoutError:
            self.log.warning(
                "group %s: %d message(s) still in flight after %.0fs; leaving them pending "
                "for the next consumer",
                self.name,
                len(self._inflight),
                grace,
            )
            self._drop_backlog()
            self._task.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.wait([self._task, *self._tasks], timeout=1.0)
            # what was in flight stays pending under our name: a successor may take it now
            self.done.set()
            return False

    # -- main loop ---------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(initial=0.1, maximum=5.0)
        pending = self.pending
        recover = True
        next_claim = 0.0
        next_retry = 0.0
        recreate = False
        try:
            while not self._stopping.is_set():
                try:
                    if recreate:
                        for key in self.keys:
                            await ensure_group(self.client, key.key, self.name, self.spec.start)
                        recreate = False
                    if recover:
                        if self.predecessor is not None:
                            await self.predecessor.wait()
                            if self._stopping.is_set():
                                break  # stopped while waiting: take nothing new
                        pending.recover()
                        recover = False
                    if pending.recovering:  # our own pending entries first, as room frees up
                        await pending.take_own()
                        if pending.recovering:
                            if self._capacity() == 0:
                                self._wake.clear()
                                await self._wake.wait()
                            continue
                    now = time.monotonic()
                    if now >= next_retry:
                        next_retry = now + self.block_ms / 1000
                        await pending.retry_due()
                    if pending.claiming:
                        await pending.claim_from_down()
                    if now >= next_claim:
                        next_claim = now + self._claim_every
                        if await pending.autoclaim():
                            next_claim = now  # a backlog of idle entries: keep taking it
                    capacity = self._capacity()
                    if capacity == 0:
                        self._wake.clear()
                        await self._wake.wait()
                        continue
                    # while a down consumer's entries remain, only glance for new ones
                    entries = await self._fetch(capacity, block=not pending.claiming)
                    if entries:
                        await self._dispatch(entries)
                    backoff.reset()
                except TRANSIENT as exc:
                    delay = backoff.next_delay()
                    self.log.warning(
                        "group %s: lost Redis (%s); retrying in %.1fs, then re-reading "
                        "pending entries",
                        self.name,
                        exc,
                        delay,
                    )
                    recover = True
                    await self._sleep(delay)
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        self.log.warning(
                            "group %s: group or stream vanished from Redis; creating it again",
                            self.name,
                        )
                        recreate = True
                        await self._sleep(backoff.next_delay())
                    else:
                        await self._unexpected(backoff)
                    recover = True
                except Exception:
                    await self._unexpected(backoff)
                    recover = True
            while self._tasks:  # what we hold, the backlog included, is finished
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._drop_backlog()
            if not self._inflight:
                self.done.set()

    def _drop_backlog(self) -> None:
        """Give up entries not started: they stay pending under our name for a successor."""
        for entry in self._backlog:
            self._inflight.discard((entry.key.key, entry.id))
        self._backlog.clear()

    async def _unexpected(self, backoff: Backoff) -> None:
        # A consumer that dies here stops its group in silence while the runner looks
        # healthy: log loudly, back off, then re-read pending entries and go on.
        delay = backoff.next_delay()
        self.log.exception(
            "group %s: unexpected error; retrying in %.1fs (what it held stays pending and "
            "is retried)",
            self.name,
            delay,
        )
        await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _capacity(self) -> int:
        if self.handler.table.inline:
            return self.spec.batch
        busy = len(self._tasks) + len(self._backlog)
        return max(0, min(self.spec.batch, self.spec.concurrency - busy))

    # -- processing --------------------------------------------------------------------

    async def _dispatch(self, entries: list[Entry]) -> None:
        if self.handler.table.inline:
            handle = self._handle
            outcomes = [await handle(e) for e in entries]
            await self._commit(outcomes)
            return
        for entry in entries:
            self._inflight.add((entry.key.key, entry.id))
            self._backlog.append(entry)
        self._start_backlog()

    def _start_backlog(self) -> None:
        # Claims and re-reads may bring more than `concurrency` entries at once; they
        # wait here so that no more than `concurrency` handlers ever run together.
        while self._backlog and len(self._tasks) < self.spec.concurrency:
            task = asyncio.create_task(self._handle_one(self._backlog.popleft()))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._start_backlog()
        self._wake.set()

    async def _handle_one(self, entry: Entry) -> None:
        try:
            outcome = await self._handle(entry)
            for attempt in range(5):
                try:
                    await self._commit([outcome])
                    break
                except TRANSIENT as exc:
                    if attempt == 4:
                        self.log.warning(
                            "group %s: cannot acknowledge %s (%s); it stays pending and is retried",
                            self.name,
                            entry.id,
                            exc,
                        )
                        break
                    await asyncio.sleep(0.2 * (attempt + 1))
        except Exception:
            # nobody awaits this task: an error left unlogged here would vanish
            self.log.exception(
                "group %s: %s from %s could not be finished; it stays pending and is retried",
                self.name,
                entry.id,
                entry.key.key,
            )
        finally:
            self._inflight.discard((entry.key.key, entry.id))
