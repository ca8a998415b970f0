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
from cortex_flow.runtime.callpool import default_pool
from cortex_flow.runtime.cancels import CancelWatch
from cortex_flow.runtime.commit import Committer
from cortex_flow.runtime.delivery import (
    ACK,
    DEAD,
    RETRY,
    TRANSIENT,
    Acks,
    Entry,
    Held,
    Outcome,
    plain_acks,
)
from cortex_flow.runtime.faultlog import FaultLog
from cortex_flow.runtime.flowgate import FlowGate
from cortex_flow.runtime.handling import EntryHandler
from cortex_flow.runtime.leases import Leases
from cortex_flow.runtime.outbox import Outbox, commit_until_done
from cortex_flow.runtime.pending import PendingWork
from cortex_flow.runtime.reader import FIND_FIRST, GroupReader
from cortex_flow.runtime.replies import Conversations
from cortex_flow.runtime.retries import RetryTimer
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.stats import GroupStats, KeyStats
from cortex_flow.runtime.threaded import ThreadedDriver
from cortex_flow.runtime.tracing import traced
from cortex_flow.wire.connection import Backoff, describe_client
from cortex_flow.wire.faults import CLUSTER_ERRORS, passing_reason
from cortex_flow.wire.groups import ensure_group
from cortex_flow.wire.redis_errors import explain, redis_user

# How long an idle consumer's read waits for new entries at most (ms): one command per
# wait. It ends in time for the next claim of idle entries; below the socket timeout.
IDLE_BLOCK_MS = 20_000

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


# how long a starting consumer waits to hear of past cancels before it reads anyway
CANCELS_READY = 2.0


class GroupConsumer:
    """Runs one Redis consumer (``runner.name``) of one group over all the group's keys.

    Entries read or claimed wait in a backlog (highest priority first) and run up to
    ``concurrency`` at a time; reads take up to a batch once there is room for one, so
    the backlog holds at most about ``concurrency`` entries more. Finished outcomes are
    committed together, after ``FLUSH_DELAY`` at most or when nothing else runs. What
    the consumer holds keeps its lease (:mod:`cortex_flow.runtime.leases`); a failed
    entry is taken back when its backoff is due, from a timer, not a poll.
    """

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
        # nothing held, nothing to retry: a read may wait longer (stop and claims cut it)
        self.idle_block_ms = max(self.block_ms, IDLE_BLOCK_MS)
        self._claim_every = max(retry.claim_idle / 4, 0.05)
        self._next_claim = 0.0  # monotonic time of the next claim of idle entries
        self._lease_every = max(retry.claim_idle / 3, 0.05)
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._idling = False  # the main loop waits for room (_idle)
        self._interrupt = asyncio.Event()  # ends an idle read early: a stop, a claim
        # (key, id) this consumer holds: running, in the backlog or waiting to be committed
        self._inflight = Held()
        # failed for good with no dead_letter: left pending, no longer claimed
        self._stuck: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._driver: ThreadedDriver | None = None  # runs the entries of sync-call tables
        # read or claimed, not started yet: one queue per key, in priority order
        self._rank = {k.key: i for i, k in enumerate(self.keys)}
        self._backlog: list[deque[Entry]] = [deque() for _ in self.keys]
        self._waiting = 0  # entries in the backlog
        self._starting = 0  # workers started that have not taken an entry yet
        self._active = 0  # handlers running now
        self._reread = False  # a commit failed for good: re-read our pending entries
        self._retries = RetryTimer()  # when our failed entries are due again
        self._key_stats: dict[str, KeyStats] = {k.key: stats.key(k.key) for k in self.keys}
        self.reader = GroupReader(
            client,
            group,
            block_ms=self.block_ms,
            cluster=cluster,
            sleep=self._sleep,
            log=self.log,
            acked=self._acked,
        )
        codec = streams[group.stream].codec
        # with tracing on, a span per message (cortex_flow.runtime.tracing); else as is
        self.handler: EntryHandler = traced(
            EntryHandler(
                group,
                table,
                codec,
                self._key_stats,
                executor=executor,
                http=http,
                log=self.log,
                group_stats=stats,
            )
        )
        # requests, deadlines, task states and cancels (runtime.replies, runtime.cancels)
        self.conversations = Conversations(group, streams, self._key_stats, self.log)
        self.cancels = CancelWatch(client, self.conversations, self.log)
        self.handler.conv = self.conversations
        self.handler.client = client
        self.committer = Committer(
            client,
            group,
            streams,
            self._key_stats,
            cluster=cluster,
            log=self.log,
            stuck=self._stuck,
            conversations=self.conversations,
        )
        self.leases = Leases(client, self.name, self.me, self.log)
        self.faults = FaultLog(self.name, stats, self.log, user=redis_user(client))
        # finished outcomes, committed together by its flusher task
        self.outbox = Outbox(
            self._commit_until_done,
            batch=self.spec.batch,
            done=self._committed,
            failed=self._commit_failed,
            group=self.name,
            log=self.log,
        )
        self.pending = PendingWork(
            client,
            group,
            self._key_stats,
            inflight=self._inflight,
            capacity=self._capacity,
            dispatch=self._dispatch,
            commit=self._commit_until_done,
            log=self.log,
            stuck=self._stuck,
        )
        # bound once: the hot path calls these per message (or per batch)
        self.gate: FlowGate | None = None  # rate, max_in_flight, dedup (runtime/flowgate.py)
        self._fetch = self.reader.fetch
        self._handle = self.handler.handle
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

    @property
    def stopping(self) -> asyncio.Event:
        """Set once the consumer is told to stop."""
        return self._stopping

    @property
    def held(self) -> int:
        """Entries this consumer holds: running, waiting to start, or to be committed."""
        return len(self._inflight)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"consumer:{self.name}")
        return self._task

    def swap_routes(self, table: RouteTable) -> None:
        """Replace the route table between two messages (a route-only reload)."""
        self.handler.table = table

    def request_claim(self, consumers: Iterable[str], min_idle: int = 0) -> None:
        """Take over another consumer's pending entries now (its agent went down), those
        idle at least ``min_idle`` ms."""
        self.pending.request_claim(consumers, min_idle)
        self._wake.set()
        self._interrupt.set()

    async def stop(self, grace: float) -> bool:
        """Stop reading, finish and acknowledge what is in flight; False if grace ran out."""
        self._stopping.set()
        self._wake.set()
        self._interrupt.set()
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
            flusher = self.outbox.cancel()
            others = [*self._tasks, *([flusher] if flusher else [])]
            if self.gate is not None:
                others += self.gate.cancel()
            for task in others:
                task.cancel()
            await asyncio.wait([self._task, *others], timeout=1.0)
            # what was in flight stays pending under our name: a successor may take it now
            self.done.set()
            return False

    # -- main loop ---------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(initial=0.1, maximum=5.0)
        pending = self.pending
        recover = True
        recreate = False
        lease = asyncio.create_task(
            self.leases.keep(self._inflight, self._lease_every, self.stats, self.faults),
            name=f"leases:{self.name}",
        )
        # always: a route-only reload may swap an inline table for one that is not
        self.outbox.start()
        self.cancels.start()
        await self.cancels.ready(CANCELS_READY)  # past cancels known before the first read
        try:
            while not self._stopping.is_set():
                try:
                    if recreate:
                        for key in self.keys:
                            await ensure_group(self.client, key.key, self.name, self.spec.start)
                        recreate = False
                    if self._reread:
                        self._reread, recover = False, True
                    if recover:
                        if self.predecessor is not None:
                            await self.predecessor.wait()
                            if self._stopping.is_set():
                                break  # stopped while waiting: take nothing new
                        self._drop_parked()  # re-read with the rest of ours
                        pending.recover()  # every entry of ours, due or not
                        self._retries.clear()
                        recover = False
                    if pending.recovering:  # our own pending entries first, one at a time
                        await pending.take_own()
                        if pending.recovering and self._capacity() == 0:
                            await self._idle()
                            continue
                    now = time.monotonic()
                    due = self._retries.next_due()
                    if due is not None and due <= now:
                        await self._retry_due(now)
                    if pending.claiming:
                        await pending.claim_from_down()
                    if now >= self._next_claim:
                        self._next_claim = now + self._claim_every
                        if await self._autoclaim():
                            self._next_claim = now  # a backlog of idle entries: keep taking it
                    capacity = self._capacity()
                    if capacity == 0 and self._acks_ride():
                        capacity = self._capacity()
                    if capacity == 0:
                        await self._idle()
                        continue
                    # while what a dead runner held is taken back (one at a time), only
                    # glance for new entries; a retry falling due ends the wait in time
                    block = not pending.isolating
                    block_ms = self._block_ms()
                    if block and block_ms > self.block_ms:
                        if self.reader.acks:  # not held through a long wait
                            self._flush_acks()
                        entries = await self._fetch_idle(capacity, block_ms)
                    else:
                        entries = await self._fetch(capacity, block=block, block_ms=block_ms)
                    if self.reader.acks:  # not sent with a read: committed by the outbox
                        self._flush_acks()
                    if self.reader.parked:  # held for later: leased meanwhile
                        self._inflight.update((e.key.key, e.id) for e in self.reader.parked)
                    if entries:
                        await self._dispatch(entries)
                    elif not block:  # the entry taken back runs: wait for it (or a while)
                        await self._idle(self.block_ms / 1000)
                    backoff.reset()
                    if self.stats.problems:
                        self.faults.cleared("blocked")
                except TRANSIENT as exc:
                    if await self._refused(exc, backoff):
                        recover = True
                        continue
                    delay = backoff.next_delay()
                    self.faults.report("unreachable", exc, f"retrying in {delay:.1f}s")
                    recover = True
                    await self._sleep(delay)
                except ResponseError as exc:
                    reason = passing_reason(exc)
                    if reason is None and await self._refused(exc, backoff):
                        recover = True
                    elif reason is not None:
                        delay = backoff.next_delay()
                        self.faults.report(reason, exc, f"retrying in {delay:.1f}s")
                        await self._sleep(delay)
                    elif "NOGROUP" in str(exc):
                        self.log.warning(
                            "group %s: group or stream vanished from Redis; creating it again",
                            self.name,
                        )
                        recreate = True
                        recover = True
                        await self._sleep(backoff.next_delay())
                    else:
                        await self._unexpected(backoff)
                        recover = True
                except CLUSTER_ERRORS as exc:  # no slot owner, redirections exhausted
                    delay = backoff.next_delay()
                    self.faults.report("failover", exc, f"retrying in {delay:.1f}s")
                    recover = True
                    await self._sleep(delay)
                except Exception:
                    await self._unexpected(backoff)
                    recover = True
            parked = self.reader.drop_parked()
            if parked:  # read before the stop: finish them too
                await self._dispatch(parked)
            if self.gate is not None:  # what waits there is given up; what passed, finished
                await self.gate.drain()
            while self._tasks:  # what we hold, the backlog included, is finished
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._flush_acks()
            await self.outbox.close()
        finally:
            lease.cancel()
            if self.gate is not None:
                self.gate.close()
            await self.handler.deadlines.close()
            await self.cancels.close()
            self._drop_backlog()
            if not self._inflight:
                self.done.set()

    async def _idle(self, timeout: float | None = None) -> None:
        """Wait for a free slot or a stop (a due retry needs a slot too), or ``timeout``."""
        self._flush_acks()  # no read comes to take them
        self._wake.clear()
        self._idling = True
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            self._idling = False

    def _block_ms(self) -> int:
        """How long a read may wait for new entries: until the next retry is due at most;
        with nothing held the longer idle wait (a failure can then only come from a read)."""
        due = self._retries.next_due()
        if due is None:
            # the longer wait once a wait found nothing (not between two busy batches)
            if not self.reader.idle or self._inflight:
                return self.block_ms
            until_claim = int((self._next_claim - time.monotonic()) * 1000)
            return max(self.block_ms, min(self.idle_block_ms, until_claim))
        return max(1, min(self.block_ms, int((due - time.monotonic()) * 1000)))

    async def _fetch_idle(self, capacity: int, block_ms: int) -> list[Entry]:
        """The idle wait: a blocking read that a stop or a claim request ends early.

        Ending it closes its connection; an entry Redis delivered just then stays pending
        under our name, so our pending entries are re-read first (unless stopping: then
        the next start under this name, or ``claim_idle``, takes it).
        """
        self._interrupt.clear()
        if self._stopping.is_set() or self.pending.claiming:
            return []
        read = asyncio.ensure_future(self._fetch(capacity, block=True, block_ms=block_ms))
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            await asyncio.wait({read, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupt.cancel()
        if read.done():
            return read.result()
        read.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await read
        if read.cancelled():
            self._reread = True
            return []
        return read.result()

    def _drop_parked(self) -> None:
        for entry in self.reader.drop_parked():
            self._inflight.discard((entry.key.key, entry.id))

    def _drop_backlog(self) -> None:
        """Give up entries not started: they stay pending under our name for a successor."""
        self._drop_parked()
        for queue in self._backlog:
            for entry in queue:
                self._inflight.discard((entry.key.key, entry.id))
            queue.clear()
        self._waiting = 0

    async def _refused(self, exc: BaseException, backoff: Backoff) -> bool:
        """An ACL, credential, TLS or DNS refusal: the group is blocked (status, /readyz),
        said once in a while, and tried again; False for any other error."""
        keys = [k.key for k in self.keys]
        why = explain(exc, user=self.faults.user, keys=keys, where=describe_client(self.client))
        if why is None:
            return False
        delay = backoff.next_delay()
        self.faults.refused("blocked", why, f"trying again every {backoff.maximum:g}s at most")
        await self._sleep(delay)
        return True

    async def _autoclaim(self) -> bool:
        """Claim entries idle past ``claim_idle`` (see PendingWork.autoclaim: XPENDING IDLE,
        then XCLAIM); an ACL refusal turns crash recovery off
        (said once in a while, shown by status) while reads go on."""
        try:
            more = await self.pending.autoclaim()
        except ResponseError as exc:
            keys = [k.key for k in self.keys]
            why = explain(exc, user=self.faults.user, command="XCLAIM", keys=keys)
            if why is None or why.kind != "acl":
                raise
            self.faults.refused("recovery", why, "reads and retries go on")
            return False
        if self.stats.problems:
            self.faults.cleared("recovery")
        return more

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

    def _capacity(self, free: int = 0) -> int:
        """How many entries to read or claim now: up to a batch, once there is room for one.

        At most ``concurrency`` run; about as many more may wait in the backlog, so a read
        takes a whole batch instead of the one or two slots that just freed. Entries
        parked, or finished and to be acknowledged with the next read, take no room; nor
        do ``free`` more.
        """
        # parked: read, waiting for a read; acknowledged with the next read
        busy = self.held - len(self.reader.parked) - free
        for ack in self.reader.acks:
            busy -= len(ack.entries)
        if self.handler.table.inline:  # a batch may be read while the last one commits
            return self.spec.batch if busy <= self.spec.batch else 0
        concurrency, batch = self.spec.concurrency, self.spec.batch
        room = min(batch, 2 * concurrency - busy)
        if busy and room < min(batch, concurrency):
            return 0  # wait for a batch's worth of room
        return max(0, room)

    # -- leases and retries ------------------------------------------------------------

    def _schedule_retry(self, outcome: Outcome) -> None:
        entry = outcome.entry
        wait = self.pending.backoff_ms(entry.deliveries) / 1000
        self._retries.schedule(entry.key.key, entry.id, entry.deliveries, wait)

    async def _retry_due(self, now: float) -> None:
        """Take back our failed entries whose backoff has passed, as many as there is room for."""
        by_key = self._retries.take_due(now, self._capacity(), self._inflight)
        # idle since our failed delivery, at least the smallest backoff: an entry another
        # consumer took over meanwhile (idle less) is left to it
        min_idle = max(0, self.pending.backoff_ms(1) - 50)
        for key in self.keys:
            rows = by_key.get(key.key)
            if rows:
                await self.pending.take(key, rows, min_idle, listed=False)

    # -- processing --------------------------------------------------------------------

    async def _dispatch(self, entries: list[Entry]) -> None:
        if self.gate is not None and not self.gate.admit_now(entries):
            # held (and leased) while they wait at the gate, beside this loop
            self._inflight.update((e.key.key, e.id) for e in entries)
            self.gate.spawn(entries, self._gated)
            return
        await self._dispatch_now(entries)

    def released(self, entries: list[Entry]) -> None:
        """Entries the gate acknowledged (duplicates) or gave up (a stop, an error)."""
        self._inflight.difference_update((e.key.key, e.id) for e in entries)
        self._wake.set()

    def gate_failed(self) -> None:
        """The gate gave entries up on an error: re-read what is pending under our name."""
        self._reread = True
        self._wake.set()

    async def _gated(self, entries: list[Entry]) -> None:
        """Entries the gate let through: from here on held as any dispatched entry is (the
        inline path holds its acknowledgements as a whole, not a (key, id) each)."""
        self._inflight.difference_update([(e.key.key, e.id) for e in entries])
        await self._dispatch_now(entries)

    async def _dispatch_now(self, entries: list[Entry]) -> None:
        table = self.handler.table
        if table.inline:
            # handled here, in order. Plain acknowledgements go in the same pipeline as
            # the next read; other outcomes are committed by the outbox's flusher while
            # the next batch is read (the two round trips overlap)
            if table.inline_sync:  # nothing else runs meanwhile: held once handled
                acks: list[Acks] = []
                outcomes = self.handler.run_batch(entries, acks)
                for ack in acks:
                    self._inflight.hold(ack)
                if self.reader.takes_acks:
                    self.reader.acks += acks
                elif acks:
                    self._to_outbox(acks)
                if outcomes:
                    self._inflight.update([(o.entry.key.key, o.entry.id) for o in outcomes])
                    self.outbox.put_all(outcomes)
                return
            held = [(e.key.key, e.id) for e in entries]
            self._inflight.update(held)  # leased meanwhile
            try:
                outcomes = await self._run_inline(entries)
            except BaseException:
                # unfinished: no longer held, so the re-read after the error takes them
                self._inflight.difference_update(held)
                raise
            if outcomes:
                self.outbox.put_all(outcomes)
            return
        rank = self._rank
        for entry in entries:
            self._inflight.add((entry.key.key, entry.id))
            self._backlog[rank[entry.key.key]].append(entry)
        self._waiting += len(entries)
        self._start_backlog()

    async def _run_inline(self, entries: list[Entry]) -> list[Outcome]:
        """The outcomes of an inline batch with async calls, handled here in order."""
        handle, task = self._handle, asyncio.current_task()
        return [await handle(entry, task) for entry in entries]

    def _start_backlog(self) -> None:
        # Reads and claims bring more than the free slots; the rest waits here, highest
        # priority first. Up to `concurrency` workers take entries from it, each until
        # none wait. One more worker is started only when none is about to take the next
        # entry: handlers that never wait leave it to one worker (a task per batch, not
        # per message), handlers that wait on I/O ramp up to `concurrency` workers. A sync
        # call always waits for its thread: those workers start together, so the calls
        # of one pass reach the threads in one hand-over.
        if self.handler.table.threaded:
            self._drive()
        elif self._waiting and not self._starting and len(self._tasks) < self.spec.concurrency:
            self._starting += 1
            task = asyncio.create_task(self._work())
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _drive(self) -> None:
        """Sync calls: one driver task keeps the entries in flight (see runtime.threaded)."""
        if self._driver is not None:
            self._driver.start()  # their calls reach the threads now
            self._driver.poke()
            return
        if not self._waiting:
            return
        self._driver = driver = ThreadedDriver(
            self.handler,
            self.executor or default_pool(),
            self.spec.concurrency,
            self._take,
            self._finish,
            self._give_up,
            self.log,
        )
        task = asyncio.create_task(driver.run(), name=f"calls:{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._driver_done)
        driver.start()  # the calls reach the threads now, not when the task first runs

    def _driver_done(self, task: asyncio.Task[None]) -> None:
        self._driver = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error(
                "group %s: the sync-call driver stopped: %s: %s; what it held is retried",
                self.name,
                type(exc).__name__,
                exc,
            )
            self._reread = True
        self._task_done(task)

    def _take(self) -> Entry | None:
        """The next entry to start, highest priority first; None if none waits."""
        if not self._waiting:
            return None
        self._waiting -= 1
        for queue in self._backlog:
            if queue:
                return queue.popleft()
        raise AssertionError("the backlog count is off")  # pragma: no cover

    def _finish(self, outcome: Outcome) -> None:
        # a batch ends when nothing else runs or waits: commit now, without the delay;
        # or, when the main loop waits for room to read, with that read (_acks_ride)
        driving = self._driver.in_flight if self._driver is not None else 0
        ended = not (self._active or self._waiting or driving)
        read = ended and self._idling and self.reader.takes_acks
        if read:
            self._wake.set()
        self.outbox.put(outcome, batch_ended=ended, read=read)

    def _acks_ride(self) -> bool:
        """Finished outcomes waiting in the outbox, all plain acknowledgements, go with
        the next read instead (one round trip for both) if that makes room to read."""
        if not self.reader.takes_acks:
            return False
        plain = self.outbox.plain()
        if not plain or not self._capacity(free=plain):
            return False
        self.reader.acks += plain_acks(self.outbox.take())
        return True

    def _give_up(self, entry: Entry) -> None:
        """An entry that could not be finished: it stays pending and is taken back."""
        self._inflight.discard((entry.key.key, entry.id))
        if self.gate is not None:
            self.gate.finished([(entry.key.key, entry.id)])

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._start_backlog()
        self._wake.set()

    async def _work(self) -> None:
        self._starting -= 1
        handle, task = self._handle, asyncio.current_task()
        while (entry := self._take()) is not None:
            self._start_backlog()  # the next entry's worker, should this one wait
            self._active += 1
            try:
                outcome = await handle(entry, task)
            except Exception:
                # nobody awaits this task: an error left unlogged here would vanish
                self.log.exception(
                    "group %s: %s from %s could not be finished; it stays pending and is retried",
                    self.name,
                    entry.id,
                    entry.key.key,
                )
                self._give_up(entry)
                continue
            finally:
                self._active -= 1
            self._finish(outcome)

    # -- committing --------------------------------------------------------------------

    async def _commit_until_done(self, outcomes: list[Outcome]) -> None:
        await commit_until_done(self.committer, outcomes, self.faults, self._schedule_retry)

    def _acked(self, acks: list[Acks], replies: list[Any]) -> None:
        """Acknowledgements sent with a read: counted, no longer held; an XACK Redis
        refused is committed again by the outbox."""
        refused: list[Acks] = []
        for ack, reply in zip(acks, replies, strict=True):
            if isinstance(reply, Exception):
                refused.append(ack)
                continue
            stats = self._key_stats[ack.key]
            stats.processed += len(ack.entries)
            stats.retried += ack.retried
            if self.gate is not None:
                self.gate.finished([(ack.key, e.id) for e in ack.entries])
            if ack.loose:
                key = ack.key
                self._inflight.difference_update([(key, e.id) for e in ack.entries])
            else:
                self._inflight.release(ack)
        if refused:
            self._to_outbox(refused)

    def _flush_acks(self) -> None:
        """Acknowledgements no read is about to send: to the outbox."""
        acks, self.reader.acks = self.reader.acks, []
        if acks:
            self._to_outbox(acks)

    def _to_outbox(self, acks: list[Acks]) -> None:
        """Acknowledgements committed by the outbox, as an outcome each (held as such)."""
        outcomes = [Outcome(e, ACK, []) for ack in acks for e in ack.entries]
        self._inflight.update([(o.entry.key.key, o.entry.id) for o in outcomes])
        for ack in acks:
            self._inflight.release(ack)
        self.outbox.put_all(outcomes)

    def _committed(self, outcomes: list[Outcome]) -> None:
        done = [(o.entry.key.key, o.entry.id) for o in outcomes]
        self._inflight.difference_update(done)
        if self.gate is not None:
            self.gate.finished(done)
        self._wake.set()

    def _commit_failed(self) -> None:
        self._reread = True
        self._wake.set()
