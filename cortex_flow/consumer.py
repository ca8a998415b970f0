"""One consumer of one group: read, route, acknowledge; retry, claim, dead-letter.

Delivery rules (see SPEC "Delivery semantics"):

- An entry is acknowledged only after its routes finished; publishes and the
  XACK go in one MULTI/EXEC when their keys share a slot (always, on a single
  server), else publish first and acknowledge after.
- A failure leaves the entry pending; it is claimed back (XCLAIM) once its
  idle time passes the backoff for its delivery count. At ``max_deliveries``
  it goes to the dead-letter stream, atomically with its XACK.
- Entries idle past ``claim_idle`` in any consumer are taken with XAUTOCLAIM.
- On start (and after a lost connection) the consumer first takes back its own
  pending entries, then reads new ones (``>``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cortex_flow.codec import DecodeError, decode
from cortex_flow.connection import Backoff, same_slot
from cortex_flow.models import StreamSpec
from cortex_flow.routes import PermanentError, Publish, RouteTable, call_route
from cortex_flow.scheduler import Scheduler
from cortex_flow.stats import GroupStats, KeyStats
from cortex_flow.templates import Now, make_context
from cortex_flow.topology import ResolvedGroup, StreamKey

TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
ACK, RETRY, DEAD = 0, 1, 2

# Reads the first non-empty stream of KEYS in the order given (one round trip).
FETCH_FIRST = """
for i, key in ipairs(KEYS) do
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', key, '>')
  if r and r[1] and #r[1][2] > 0 then return {i, r[1][2]} end
end
return false
"""


@dataclass(slots=True)
class Entry:
    key: StreamKey
    id: str
    fields: dict[str, str]
    deliveries: int


@dataclass(slots=True)
class Outcome:
    entry: Entry
    kind: int
    publishes: list[Publish]
    error: str = ""


def _pairs(flat: list[Any]) -> dict[str, str]:
    it = iter(flat)
    return dict(zip(it, it, strict=True))


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
        self.table = table
        self.stats = stats
        self.name = group.name
        self.me = group.consumer
        self.spec = group.spec
        self.keys = list(group.keys)
        self.codec = streams[group.stream].codec
        self.cluster = cluster
        self.executor = executor
        self.http = http
        self.predecessor = predecessor
        self.done = asyncio.Event()  # set when stopped with nothing of ours in flight
        self.log = log or logging.getLogger("cortex_flow.consumer")
        retry = self.spec.retry
        self.max_deliveries = retry.max_deliveries
        self.block_ms = max(10, int(min(block, retry.backoff.initial) * 1000))
        self._claim_every = max(retry.claim_idle / 4, 0.05)
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._inflight: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._claim_from: set[str] = set()
        self._scheduler = Scheduler(self.keys, self.spec.priority, self.spec.weights)
        self._script: Any = None
        if len(self.keys) > 1 and (not cluster or same_slot(*[k.key for k in self.keys])):
            self._script = client.register_script(FETCH_FIRST)
        self._key_stats: dict[str, KeyStats] = {k.key: stats.key(k.key) for k in self.keys}
        self._base_vars: dict[str, Any] = dict(self.spec.vars)
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"consumer:{self.name}")
        return self._task

    def swap_routes(self, table: RouteTable) -> None:
        """Replace the route table between two messages (a route-only reload)."""
        self.table = table

    def request_claim(self, consumers: Iterable[str]) -> None:
        """Take over another consumer's pending entries now (its agent went down)."""
        self._claim_from.update(c for c in consumers if c != self.me)
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
            self._task.cancel()
            for task in list(self._tasks):
                task.cancel()
            return False

    # -- main loop ---------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(initial=0.1, maximum=5.0)
        recover = True
        next_claim = 0.0
        next_retry = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if recover:
                        if self.predecessor is not None:
                            await self.predecessor.wait()
                        await self._take_own_pending()
                        recover = False
                    now = time.monotonic()
                    if now >= next_retry:
                        next_retry = now + self.block_ms / 1000
                        await self._retry_due()
                    if self._claim_from:
                        await self._claim_consumers()
                    if now >= next_claim:
                        next_claim = now + self._claim_every
                        await self._autoclaim()
                    capacity = self._capacity()
                    if capacity == 0:
                        self._wake.clear()
                        await self._wake.wait()
                        continue
                    entries = await self._fetch(capacity)
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
                    if "NOGROUP" not in str(exc):
                        raise
                    self.log.warning(
                        "group %s: group or stream vanished from Redis; creating it again",
                        self.name,
                    )
                    await self._sleep(backoff.next_delay())
                    for key in self.keys:
                        await ensure_group(self.client, key.key, self.name, self.spec.start)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            if not self._inflight:
                self.done.set()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    def _capacity(self) -> int:
        if self.table.inline:
            return self.spec.batch
        return max(0, min(self.spec.batch, self.spec.concurrency - len(self._tasks)))

    # -- reading -----------------------------------------------------------------------

    def _parse(self, key: StreamKey, raw: list[Any], deliveries: int) -> list[Entry]:
        out = []
        for item in raw:
            entry_id, fields = item[0], item[1]
            if fields is None:
                continue
            if isinstance(fields, list):
                fields = _pairs(fields)
            out.append(Entry(key, entry_id, fields, deliveries))
        return out

    async def _fetch(self, count: int) -> list[Entry]:
        if len(self.keys) == 1:
            key = self.keys[0]
            resp = await self.client.xreadgroup(
                self.name, self.me, {key.key: ">"}, count=count, block=self.block_ms
            )
            return self._parse(key, resp[0][1], 1) if resp else []
        order = self._scheduler.order()
        if self._script is not None:
            try:
                resp = await self._script(
                    keys=[self.keys[i].key for i in order], args=[self.name, self.me, count]
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    raise
                self.log.info("group %s: server-side fetch unavailable (%s)", self.name, exc)
                self._script = None
                resp = None
            if resp:
                index = order[int(resp[0]) - 1]
                self._scheduler.served(index)
                return self._parse(self.keys[index], resp[1], 1)
        else:
            for index in order:
                key = self.keys[index]
                resp = await self.client.xreadgroup(self.name, self.me, {key.key: ">"}, count=count)
                if resp and resp[0][1]:
                    self._scheduler.served(index)
                    return self._parse(key, resp[0][1], 1)
        if self.cluster and self._script is None:
            await self._sleep(self.block_ms / 1000)  # keys in different slots: poll
            return []
        started = time.monotonic()
        resp = await self.client.xreadgroup(
            self.name, self.me, {k.key: ">" for k in self.keys}, count=count, block=self.block_ms
        )
        if not resp:
            if time.monotonic() - started < self.block_ms / 2000:
                await self._sleep(0.02)  # a server (or fake) that does not block
            return []
        by_key = {k.key: k for k in self.keys}
        rank = {k.key: i for i, k in enumerate(self.keys)}
        entries: list[Entry] = []
        for stream, items in sorted(resp, key=lambda r: rank[r[0]]):
            entries.extend(self._parse(by_key[stream], items, 1))
        return entries

    # -- processing --------------------------------------------------------------------

    async def _dispatch(self, entries: list[Entry]) -> None:
        if self.table.inline:
            outcomes = [await self._handle(e) for e in entries]
            await self._commit(outcomes)
            return
        for entry in entries:
            self._inflight.add((entry.key.key, entry.id))
            task = asyncio.create_task(self._handle_one(entry))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
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
                    await asyncio.sleep(0.2 * (attempt + 1))
        finally:
            self._inflight.discard((entry.key.key, entry.id))

    async def _handle(self, entry: Entry) -> Outcome:
        try:
            msg = decode(self.codec, entry.fields)
        except DecodeError as exc:
            return Outcome(entry, DEAD, [], f"cannot decode: {exc}")
        key = entry.key
        bound = {"priority": key.priority, "agent": key.agent, **self._base_vars}
        table = self.table
        ctx = None
        if table.needs_context:
            ctx = make_context(
                {
                    **bound,
                    "msg": msg,
                    "agents": table.agents,
                    "id": entry.id,
                    "stream": key.key,
                    "group": self.name,
                    "deliveries": entry.deliveries,
                    "now": Now(),
                }
            )
        publishes: list[Publish] = []
        matched = False
        started = time.perf_counter()
        try:
            for route in table.routes:
                if route.when is not None and not route.matches(ctx):
                    continue
                matched = True
                action = route.action
                if action == "to":
                    publishes.append(route.publish(msg, ctx, bound))
                elif action == "call":
                    if route.inline and not route.is_async:
                        route.fn(msg)  # type: ignore[misc]
                    else:
                        await call_route(route, msg, self.executor)
                elif action == "http":
                    await self._post(route, msg, ctx)
                if not route.continue_:
                    break
        except PermanentError as exc:
            return Outcome(entry, DEAD, [], str(exc))
        except TimeoutError:
            return self._failed(entry, f"timed out after {route.timeout:g}s ({route.label})")
        except Exception as exc:
            return self._failed(entry, f"{route.label}: {type(exc).__name__}: {exc}")
        finally:
            self._key_stats[key.key].latency.observe(time.perf_counter() - started)
        if not matched:
            self._key_stats[key.key].unmatched += 1
            if self.group.dead_letter is not None:
                return Outcome(entry, DEAD, [], "no route matched")
        return Outcome(entry, ACK, publishes)

    def _failed(self, entry: Entry, error: str) -> Outcome:
        if entry.deliveries >= self.max_deliveries:
            return Outcome(entry, DEAD, [], error)
        return Outcome(entry, RETRY, [], error)

    async def _post(self, route: Any, msg: Any, ctx: Any) -> None:
        if self.http is None:
            raise RuntimeError("no HTTP client available")
        spec = route.route.http
        url = route.url.render(ctx) if not route.url.is_literal else route.url.source
        async with asyncio.timeout(route.timeout):
            async with self.http.request(
                spec.method, url, json=dict(msg), headers=spec.headers
            ) as resp:
                if resp.status >= 300:
                    body = (await resp.text())[:200]
                    raise RuntimeError(f"HTTP {resp.status} from {url}: {body}")

    # -- committing --------------------------------------------------------------------

    def _dead_letter(self, outcome: Outcome) -> Publish:
        entry = outcome.entry
        fields = dict(entry.fields)
        fields.update(
            dlq_stream=entry.key.key,
            dlq_id=entry.id,
            dlq_group=self.name,
            dlq_deliveries=str(entry.deliveries),
            dlq_error=outcome.error[:4000],
            dlq_at=_iso_now(),
        )
        assert self.group.dead_letter is not None
        return Publish(self.group.dead_letter, fields, None)

    async def _commit(self, outcomes: list[Outcome]) -> None:
        """Apply a batch of outcomes: publishes, dead letters and XACKs together."""
        acks: dict[str, list[str]] = {}
        adds: list[tuple[str, Publish]] = []  # (source key, publish)
        done: list[Outcome] = []
        for outcome in outcomes:
            entry = outcome.entry
            source = entry.key.key
            if outcome.kind == RETRY:
                self._key_stats[source].failed += 1
                self.log.warning(
                    "group %s: %s from %s failed (delivery %d of %d): %s; will retry",
                    self.name,
                    entry.id,
                    source,
                    entry.deliveries,
                    self.max_deliveries,
                    outcome.error,
                )
                continue
            if outcome.kind == DEAD:
                if self.group.dead_letter is None:
                    self.log.error(
                        "group %s: %s from %s failed for good (%s) and the group has no "
                        "dead_letter; it stays pending. Add dead_letter: to the group",
                        self.name,
                        entry.id,
                        source,
                        outcome.error,
                    )
                    continue
                adds.append((source, self._dead_letter(outcome)))
            else:
                adds.extend((source, p) for p in outcome.publishes)
            acks.setdefault(source, []).append(entry.id)
            done.append(outcome)
        if not acks:
            return
        if not adds:
            if len(acks) == 1:
                key, ids = next(iter(acks.items()))
                await self.client.xack(key, self.name, *ids)
            else:
                pipe = self.client.pipeline(transaction=False)
                for key, ids in acks.items():
                    pipe.xack(key, self.name, *ids)
                await pipe.execute()
        elif not self.cluster:
            pipe = self.client.pipeline(transaction=True)
            for _, p in adds:
                pipe.xadd(p.key, p.fields, maxlen=p.maxlen, approximate=True)
            for key, ids in acks.items():
                pipe.xack(key, self.name, *ids)
            await pipe.execute()
        else:
            await self._commit_cluster(adds, acks)
        for outcome in done:
            stats = self._key_stats[outcome.entry.key.key]
            if outcome.kind == DEAD:
                stats.dead_lettered += 1
                self.log.warning(
                    "group %s: %s from %s dead-lettered to %s after %d deliver%s: %s",
                    self.name,
                    outcome.entry.id,
                    outcome.entry.key.key,
                    self.group.dead_letter,
                    outcome.entry.deliveries,
                    "y" if outcome.entry.deliveries == 1 else "ies",
                    outcome.error,
                )
            else:
                stats.processed += 1
            if outcome.entry.deliveries > 1:
                stats.retried += 1

    async def _commit_cluster(
        self, adds: list[tuple[str, Publish]], acks: dict[str, list[str]]
    ) -> None:
        """Cluster: atomic per source key where targets share its slot, else add then ack."""
        for source, ids in acks.items():
            mine = [p for s, p in adds if s == source]
            atomic = same_slot(source, *[p.key for p in mine])
            pipe = self.client.pipeline(transaction=atomic)
            for p in mine:
                pipe.xadd(p.key, p.fields, maxlen=p.maxlen, approximate=True)
            if atomic:
                pipe.xack(source, self.name, *ids)
                await pipe.execute()
            else:
                await pipe.execute()  # publish first: a crash now duplicates, never loses
                await self.client.xack(source, self.name, *ids)

    # -- pending, retries, claims ---------------------------------------------------------

    def _backoff_ms(self, deliveries: int) -> int:
        b = self.spec.retry.backoff
        return int(min(b.initial * b.multiplier ** max(deliveries - 1, 0), b.max) * 1000)

    async def _take(self, key: StreamKey, rows: list[dict[str, Any]], min_idle: int) -> None:
        """XCLAIM ``rows`` (XPENDING rows) to this consumer and process them."""
        rows = [r for r in rows if (key.key, r["message_id"]) not in self._inflight]
        if not rows:
            return
        counts = {r["message_id"]: int(r["times_delivered"]) for r in rows}
        claimed = await self.client.xclaim(
            key.key, self.name, self.me, min_idle_time=min_idle, message_ids=list(counts)
        )
        await self._process_claimed(key, claimed, counts, increment=1)

    async def _process_claimed(
        self, key: StreamKey, claimed: list[Any], counts: dict[str, int], increment: int
    ) -> None:
        entries = []
        seen = set()
        for item in claimed or []:
            entry_id, fields = item[0], item[1]
            seen.add(entry_id)
            if fields is None:
                continue
            if isinstance(fields, list):
                fields = _pairs(fields)
            entries.append(Entry(key, entry_id, fields, counts.get(entry_id, 0) + increment))
        gone = [i for i in counts if i not in seen or i not in {e.id for e in entries}]
        if gone:
            self.log.warning(
                "group %s: %d pending entr%s of %s no longer exist (trimmed or "
                "deleted); acknowledging them",
                self.name,
                len(gone),
                "y" if len(gone) == 1 else "ies",
                key.key,
            )
            await self.client.xack(key.key, self.name, *gone)
        if not entries:
            return
        dead = [e for e in entries if e.deliveries > self.max_deliveries]
        live = [e for e in entries if e.deliveries <= self.max_deliveries]
        if dead:
            await self._commit(
                [
                    Outcome(
                        e,
                        DEAD,
                        [],
                        f"delivered {e.deliveries - 1} times without being "
                        "acknowledged (its consumer crashed or timed out each time)",
                    )
                    for e in dead
                ]
            )
        if live:
            await self._dispatch(live)

    async def _take_own_pending(self) -> None:
        for key in self.keys:
            start = "-"
            while True:
                rows = await self.client.xpending_range(
                    key.key, self.name, start, "+", self.spec.batch, consumername=self.me
                )
                if not rows:
                    break
                await self._take(key, rows, 0)
                if len(rows) < self.spec.batch:
                    break
                start = "(" + rows[-1]["message_id"]

    async def _retry_due(self) -> None:
        first = self._backoff_ms(1)
        for key in self.keys:
            rows = await self.client.xpending_range(
                key.key, self.name, "-", "+", self.spec.batch, consumername=self.me, idle=first
            )
            due = [
                r
                for r in rows
                if r["time_since_delivered"] >= self._backoff_ms(int(r["times_delivered"]))
            ]
            if due:
                await self._take(key, due, first)

    async def _claim_consumers(self) -> None:
        names, self._claim_from = self._claim_from, set()
        for key in self.keys:
            for name in sorted(names):
                rows = await self.client.xpending_range(
                    key.key, self.name, "-", "+", 1000, consumername=name
                )
                if rows:
                    self.log.info(
                        "group %s: claiming %d pending entr%s of %s from %s (down)",
                        self.name,
                        len(rows),
                        "y" if len(rows) == 1 else "ies",
                        name,
                        key.key,
                    )
                    self._key_stats[key.key].claimed += len(rows)
                    await self._take(key, rows, 0)

    async def _autoclaim(self) -> None:
        idle = int(self.spec.retry.claim_idle * 1000)
        for key in self.keys:
            reply = await self.client.xautoclaim(
                key.key, self.name, self.me, idle, "0-0", count=self.spec.batch
            )
            # Redis 6.2 replies [cursor, entries]; 7.x adds the IDs it found deleted
            claimed = [c for c in reply[1] if (key.key, c[0]) not in self._inflight]
            if not claimed:
                continue
            ids = [c[0] for c in claimed]
            rows = await self.client.xpending_range(
                key.key, self.name, ids[0], ids[-1], len(ids) * 2 + 10, consumername=self.me
            )
            counts = {r["message_id"]: int(r["times_delivered"]) - 1 for r in rows}
            self._key_stats[key.key].claimed += len(claimed)
            self.log.info(
                "group %s: claimed %d entr%s of %s idle over %gs",
                self.name,
                len(claimed),
                "y" if len(claimed) == 1 else "ies",
                key.key,
                self.spec.retry.claim_idle,
            )
            await self._process_claimed(key, claimed, counts, increment=1)
