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
import heapq
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.topology import ResolvedGroup
from cortex_flow.runtime.commit import CommitDeferred, Committer
from cortex_flow.runtime.delivery import ACK, DEAD, RETRY, TRANSIENT, Entry, Outcome
from cortex_flow.runtime.handling import EntryHandler
from cortex_flow.runtime.leases import Leases
from cortex_flow.runtime.pending import PendingWork
from cortex_flow.runtime.reader import FIND_FIRST, GroupReader
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.stats import GroupStats, KeyStats
from cortex_flow.wire.connection import Backoff
from cortex_flow.wire.faults import passing_reason

# finished outcomes wait at most this long to be committed with others (one round trip)
FLUSH_DELAY = 0.002
# a passing Redis error (out of memory, read-only, no answer) is logged once per group and
# reason in this many seconds, with how often it happened meanwhile
FAULT_LOG_EVERY = 10.0

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
        self._claim_every = max(retry.claim_idle / 4, 0.05)
        self._lease_every = max(retry.claim_idle / 3, 0.05)
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        # (key, id) this consumer holds: running, in the backlog or waiting to be committed
        self._inflight: set[tuple[str, str]] = set()
        # failed for good with no dead_letter: left pending, no longer claimed
        self._stuck: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # read or claimed, not started yet: one queue per key, in priority order
        self._rank = {k.key: i for i, k in enumerate(self.keys)}
        self._backlog: list[deque[Entry]] = [deque() for _ in self.keys]
        self._waiting = 0  # entries in the backlog
        self._starting = 0  # workers started that have not taken an entry yet
        self._active = 0  # handlers running now
        # finished, to commit together; the flusher commits them
        self._outbox: list[Outcome] = []
        self._outbox_ready = asyncio.Event()
        self._outbox_full = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._reread = False  # a commit failed for good: re-read our pending entries
        # (due, key, id, deliveries) of our failed entries, soonest first
        self._due: list[tuple[float, str, str, int]] = []
        self._due_at: dict[tuple[str, str], float] = {}  # the current due time of each
        self._fault_counts: dict[str, int] = {}
        self._fault_logged: dict[str, float] = {}
        self._key_stats: dict[str, KeyStats] = {k.key: stats.key(k.key) for k in self.keys}
        self.reader = GroupReader(
            client, group, block_ms=self.block_ms, cluster=cluster, sleep=self._sleep, log=self.log
        )
        codec = streams[group.stream].codec
        self.handler = EntryHandler(
            group,
            table,
            codec,
            self._key_stats,
            executor=executor,
            http=http,
            log=self.log,
            group_stats=stats,
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
        self.leases = Leases(client, self.name, self.me, self.log)
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
            others = [*self._tasks, *([self._flusher] if self._flusher else [])]
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
        next_claim = 0.0
        recreate = False
        lease = asyncio.create_task(self._renew_leases(), name=f"leases:{self.name}")
        # always: a route-only reload may swap an inline table for one that is not
        self._flusher = asyncio.create_task(self._flush_loop(), name=f"commit:{self.name}")
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
                        pending.recover()  # every entry of ours, due or not
                        self._due.clear()
                        self._due_at.clear()
                        recover = False
                    if pending.recovering:  # our own pending entries first, as room frees up
                        await pending.take_own()
                        if pending.recovering:
                            if self._capacity() == 0:
                                await self._idle()
                            continue
                    now = time.monotonic()
                    if self._due and self._due[0][0] <= now:
                        await self._retry_due(now)
                    if pending.claiming:
                        await pending.claim_from_down()
                    if now >= next_claim:
                        next_claim = now + self._claim_every
                        if await pending.autoclaim():
                            next_claim = now  # a backlog of idle entries: keep taking it
                    capacity = self._capacity()
                    if capacity == 0:
                        await self._idle()
                        continue
                    # while a down consumer's entries remain, only glance for new ones;
                    # a retry falling due ends the wait for new entries in time
                    block = not pending.claiming
                    entries = await self._fetch(capacity, block=block, block_ms=self._block_ms())
                    if entries:
                        await self._dispatch(entries)
                    backoff.reset()
                except TRANSIENT as exc:
                    delay = backoff.next_delay()
                    self._fault("unreachable", exc, f"retrying in {delay:.1f}s")
                    recover = True
                    await self._sleep(delay)
                except ResponseError as exc:
                    reason = passing_reason(exc)
                    if reason is not None:
                        delay = backoff.next_delay()
                        self._fault(reason, exc, f"retrying in {delay:.1f}s")
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
                except Exception:
                    await self._unexpected(backoff)
                    recover = True
            while self._tasks:  # what we hold, the backlog included, is finished
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._close_outbox()
        finally:
            lease.cancel()
            self._drop_backlog()
            if not self._inflight:
                self.done.set()

    async def _idle(self) -> None:
        """Wait for a free slot (or a stop), but no longer than the next retry's due time."""
        self._wake.clear()
        timeout = None
        if self._due:
            timeout = max(0.0, self._due[0][0] - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _block_ms(self) -> int:
        if not self._due:
            return self.block_ms
        until = int((self._due[0][0] - time.monotonic()) * 1000)
        return max(1, min(self.block_ms, until))

    def _drop_backlog(self) -> None:
        """Give up entries not started: they stay pending under our name for a successor."""
        for queue in self._backlog:
            for entry in queue:
                self._inflight.discard((entry.key.key, entry.id))
            queue.clear()
        self._waiting = 0

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

    def _fault(self, reason: str, exc: BaseException, then: str) -> None:
        """Count a passing Redis error; log it at most once per ``FAULT_LOG_EVERY``."""
        self.stats.redis_errors[reason] = self.stats.redis_errors.get(reason, 0) + 1
        self._fault_counts[reason] = self._fault_counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._fault_logged.get(reason, -FAULT_LOG_EVERY) < FAULT_LOG_EVERY:
            return
        self._fault_logged[reason] = now
        count, self._fault_counts[reason] = self._fault_counts[reason], 0
        what = {
            "unreachable": "Redis does not answer",
            "oom": "Redis is out of memory (maxmemory)",
            "readonly": "Redis is read-only (a replica, or a failover under way)",
            "loading": "Redis is loading its data",
            "failover": "the Redis master is down or moving",
            "busy": "Redis is busy running a script",
            "misconf": "Redis refuses writes (MISCONF: it cannot persist)",
        }.get(reason, f"Redis refused ({reason})")
        self.log.warning(
            "group %s: %s (%s); %s. Outcomes are kept and committed once it recovers; "
            "nothing is counted as a failure or dead-lettered for it (%d time%s since "
            "last said)",
            self.name,
            what,
            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
            then,
            count,
            "" if count == 1 else "s",
        )

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _capacity(self) -> int:
        """How many entries to read or claim now: up to a batch, once there is room for one.

        At most ``concurrency`` run; about as many more may wait in the backlog, so a read
        takes a whole batch instead of the one or two slots that just freed.
        """
        if self.handler.table.inline:
            return self.spec.batch
        concurrency, batch = self.spec.concurrency, self.spec.batch
        busy = self.held
        room = min(batch, 2 * concurrency - busy)
        if busy and room < min(batch, concurrency):
            return 0  # wait for a batch's worth of room
        return max(0, room)

    # -- leases and retries ------------------------------------------------------------

    async def _renew_leases(self) -> None:
        """Every third of ``claim_idle``: keep what we hold from being claimed by others."""
        while True:
            await asyncio.sleep(self._lease_every)
            held: dict[str, list[str]] = {}
            for key, entry_id in self._inflight:
                held.setdefault(key, []).append(entry_id)
            if not held:
                continue
            try:
                self.stats.leases_lost += len(await self.leases.renew(held))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = passing_reason(exc) or "error"
                self._fault(reason, exc, "leases are renewed again next time")

    def _schedule_retry(self, outcome: Outcome) -> None:
        entry = outcome.entry
        wait = self.pending.backoff_ms(entry.deliveries) / 1000
        due = time.monotonic() + wait
        self._due_at[(entry.key.key, entry.id)] = due
        heapq.heappush(self._due, (due, entry.key.key, entry.id, entry.deliveries))

    async def _retry_due(self, now: float) -> None:
        """Take back our failed entries whose backoff has passed, as many as there is room for."""
        room = self._capacity()
        by_key: dict[str, list[dict[str, Any]]] = {}
        while self._due and self._due[0][0] <= now and room > 0:
            due, source, entry_id, deliveries = heapq.heappop(self._due)
            if self._due_at.get((source, entry_id)) != due:
                continue  # failed again since, or re-read: a later due time stands
            del self._due_at[(source, entry_id)]
            if (source, entry_id) in self._inflight:
                continue
            rows = by_key.setdefault(source, [])
            rows.append({"message_id": entry_id, "times_delivered": deliveries})
            room -= 1
        for key in self.keys:
            rows = by_key.get(key.key, [])
            if rows:
                # idle since our failed delivery, at least the smallest backoff: an entry
                # another consumer took over meanwhile (idle less) is left to it
                first = self.pending.backoff_ms(1)
                await self.pending.take(key, rows, max(0, first - 50), listed=False)

    # -- processing --------------------------------------------------------------------

    async def _dispatch(self, entries: list[Entry]) -> None:
        if self.handler.table.inline:
            handle = self._handle
            held = {(e.key.key, e.id) for e in entries}
            self._inflight |= held  # leased while handled and committed
            try:
                outcomes = [await handle(e) for e in entries]
                await self._commit_until_done(outcomes)
            finally:
                self._inflight -= held
            return
        rank = self._rank
        for entry in entries:
            self._inflight.add((entry.key.key, entry.id))
            self._backlog[rank[entry.key.key]].append(entry)
        self._waiting += len(entries)
        self._start_backlog()

    def _start_backlog(self) -> None:
        # Reads and claims bring more than the free slots; the rest waits here, highest
        # priority first. Up to `concurrency` workers take entries from it, each until
        # none wait: no more than `concurrency` handlers run together, and a worker costs
        # one task per run of entries, not one per message.
        limit = self.spec.concurrency
        while self._waiting > self._starting and len(self._tasks) < limit:
            self._starting += 1
            task = asyncio.create_task(self._work())
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._start_backlog()
        self._wake.set()

    async def _work(self) -> None:
        self._starting -= 1
        backlog = self._backlog
        while self._waiting:
            queue = next(q for q in backlog if q)
            self._waiting -= 1
            await self._handle_one(queue.popleft())

    async def _handle_one(self, entry: Entry) -> None:
        self._active += 1
        try:
            outcome = await self._handle(entry)
        except Exception:
            # nobody awaits this task: an error left unlogged here would vanish
            self.log.exception(
                "group %s: %s from %s could not be finished; it stays pending and is retried",
                self.name,
                entry.id,
                entry.key.key,
            )
            self._inflight.discard((entry.key.key, entry.id))
            return
        finally:
            self._active -= 1
        self._outbox.append(outcome)
        self._outbox_ready.set()
        # a batch ends when nothing else runs or waits: commit now, without the delay
        if len(self._outbox) >= self.spec.batch or not (self._active or self._waiting):
            self._outbox_full.set()

    # -- committing --------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        """Commit finished outcomes together: after ``FLUSH_DELAY`` at most, at once when a
        batch is full or nothing else is running."""
        while not self._closing:
            await self._outbox_ready.wait()
            if not self._outbox_full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._outbox_full.wait(), FLUSH_DELAY)
            try:
                await self._flush()
            except Exception:
                # the flusher must outlive one failed commit, or nothing would be committed
                # again; what it held stays pending and is re-read from the main loop
                self.log.exception(
                    "group %s: committing finished messages failed; they stay pending and "
                    "are taken back",
                    self.name,
                )
                self._reread = True
                self._wake.set()

    async def _flush(self) -> None:
        outcomes, self._outbox = self._outbox, []
        self._outbox_ready.clear()
        self._outbox_full.clear()
        if not outcomes:
            return
        try:
            await self._commit_until_done(outcomes)
        finally:
            for outcome in outcomes:
                self._inflight.discard((outcome.entry.key.key, outcome.entry.id))
            self._wake.set()

    async def _close_outbox(self) -> None:
        """At stop: let the flusher commit what finished and end (never cut off mid-commit)."""
        self._closing = True
        self._outbox_ready.set()
        self._outbox_full.set()
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            await flusher
        await self._flush()

    async def _commit_until_done(self, outcomes: list[Outcome]) -> None:
        """Commit, keeping outcomes through passing Redis errors (no answer, out of memory,
        read-only, loading): they are committed again with backoff, counted neither as a
        delivery nor as a failure. A stop whose grace runs out leaves them pending."""
        retries = [o for o in outcomes if o.kind == RETRY]
        delay = 0.05
        while True:
            try:
                await self.committer.commit(outcomes)
                break
            except CommitDeferred as exc:
                outcomes = exc.outcomes
                self._fault(exc.reason, exc, f"committing again in {delay:.2g}s")
            except (*TRANSIENT, ResponseError) as exc:
                reason = passing_reason(exc)
                if reason is None:
                    raise
                self._fault(reason, exc, f"committing again in {delay:.2g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        for outcome in retries:
            self._schedule_retry(outcome)
