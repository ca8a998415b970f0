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
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jinja2.runtime import Context
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cortex_flow.codec import DecodeError, decode
from cortex_flow.connection import Backoff, same_slot
from cortex_flow.models import StreamSpec
from cortex_flow.routes import PermanentError, Publish, RouteTable, call_route
from cortex_flow.scheduler import Scheduler
from cortex_flow.stats import GroupStats, KeyStats
from cortex_flow.templates import Now, context_base, context_over
from cortex_flow.topology import ResolvedGroup, StreamKey

TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
ACK, RETRY, DEAD = 0, 1, 2

# The index (from 1) of the first of KEYS, in the order given, holding entries group
# ARGV[1] has not read yet, or 0. It reads nothing: the consumer then XREADGROUPs that
# key. (Reading in the script costs Redis several times the read itself: it copies every
# entry into Lua and back.) A missing key or group counts as found: XREADGROUP then
# reports NOGROUP.
FIND_FIRST = """
for i, key in ipairs(KEYS) do
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if groups.err then return i end
  local last
  for _, g in ipairs(groups) do
    local name, id
    for j = 1, #g, 2 do
      if g[j] == 'name' then name = g[j + 1]
      elseif g[j] == 'last-delivered-id' then id = g[j + 1] end
    end
    if name == ARGV[1] then last = id break end
  end
  if last == nil then return i end
  if #redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', 1) > 0 then return i end
end
return 0
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
        dlq = self.spec.dead_letter
        self._dlq_maxlen = streams[dlq].maxlen if dlq is not None and dlq in streams else None
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
        # claimed or re-read entries beyond `concurrency`: in flight for us, not started yet
        self._backlog: deque[Entry] = deque()
        self._autoclaim_cursor: dict[str, str] = {}
        self._claim_from: set[str] = set()
        self._scheduler = Scheduler(self.keys, self.spec.priority, self.spec.weights)
        self._script: Any = None
        if len(self.keys) > 1 and (not cluster or same_slot(*[k.key for k in self.keys])):
            self._script = client.register_script(FIND_FIRST)
        self._key_stats: dict[str, KeyStats] = {k.key: stats.key(k.key) for k in self.keys}
        self._base_vars: dict[str, Any] = dict(self.spec.vars)
        # per source key, built once: the key's variables (read-only), and the names a
        # template context holds for every message of that key under ``_ctx_table``
        self._bound: dict[str, dict[str, Any]] = {}
        self._ctx_base: dict[str, dict[str, Any]] = {}
        self._ctx_table: RouteTable | None = None
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
                        if await self._autoclaim():
                            next_claim = now  # a backlog of idle entries: keep taking it
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
        if self.table.inline:
            return self.spec.batch
        busy = len(self._tasks) + len(self._backlog)
        return max(0, min(self.spec.batch, self.spec.concurrency - busy))

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
                first = await self._script(keys=[self.keys[i].key for i in order], args=[self.name])
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    raise
                self.log.info("group %s: server-side fetch unavailable (%s)", self.name, exc)
                self._script = None
                first = 0
            if first:
                index = order[int(first) - 1]
                key = self.keys[index]
                resp = await self.client.xreadgroup(self.name, self.me, {key.key: ">"}, count=count)
                if resp and resp[0][1]:
                    self._scheduler.served(index)
                    return self._parse(key, resp[0][1], 1)
                return []  # another consumer of the group took them meanwhile: look again
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

    async def _handle(self, entry: Entry) -> Outcome:
        try:
            msg = decode(self.codec, entry.fields)
        except DecodeError as exc:
            return Outcome(entry, DEAD, [], f"cannot decode: {exc}")
        key = entry.key
        bound = self._bound.get(key.key)
        if bound is None:
            bound = {"priority": key.priority, "agent": key.agent, **self._base_vars}
            self._bound[key.key] = bound
        table = self.table
        ctx = None
        if table.needs_context:
            ctx = self._context(entry, msg, bound, table)
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

    def _context(self, entry: Entry, msg: Any, bound: dict[str, Any], table: RouteTable) -> Context:
        """The template context of one message; what its key and table fix is built once."""
        key = entry.key.key
        if self._ctx_table is not table:  # a route-only reload may change ``agents``
            self._ctx_table, self._ctx_base = table, {}
        base = self._ctx_base.get(key)
        if base is None:
            base = {**bound, "agents": table.agents, "stream": key, "group": self.name}
            base = self._ctx_base[key] = context_base(base)
        values = base.copy()
        values["msg"] = msg
        values["id"] = entry.id
        values["deliveries"] = entry.deliveries
        values["now"] = Now()
        return context_over(values)

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
        return Publish(self.group.dead_letter, fields, self._dlq_maxlen)

    async def _commit(self, outcomes: list[Outcome]) -> None:
        """Apply a batch of outcomes: publishes, dead letters and XACKs together."""
        acks: dict[str, list[str]] = {}
        adds: list[tuple[Outcome, Publish]] = []
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
                adds.append((outcome, self._dead_letter(outcome)))
            else:
                adds.extend((outcome, p) for p in outcome.publishes)
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
            results = await pipe.execute(raise_on_error=False)
            lost = await self._rescue(adds, results)
            done = [o for o in done if id(o) not in lost]
        else:
            lost = await self._commit_cluster(adds, acks)
            done = [o for o in done if id(o) not in lost]
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
        self, adds: list[tuple[Outcome, Publish]], acks: dict[str, list[str]]
    ) -> set[int]:
        """Cluster: atomic per source key where targets share its slot, else add then ack."""
        lost: set[int] = set()
        for source, ids in acks.items():
            mine = [(o, p) for o, p in adds if o.entry.key.key == source]
            atomic = same_slot(source, *[p.key for _, p in mine])
            pipe = self.client.pipeline(transaction=atomic)
            for _, p in mine:
                pipe.xadd(p.key, p.fields, maxlen=p.maxlen, approximate=True)
            if atomic:
                pipe.xack(source, self.name, *ids)
                lost |= await self._rescue(mine, await pipe.execute(raise_on_error=False))
            else:
                await pipe.execute()  # publish first: a crash now duplicates, never loses
                await self.client.xack(source, self.name, *ids)
        return lost

    async def _rescue(self, adds: list[tuple[Outcome, Publish]], results: list[Any]) -> set[int]:
        """Dead-letter entries whose publish Redis rejected inside an applied MULTI/EXEC.

        EXEC does not roll back: a command failing at run time (WRONGTYPE: the target key
        is not a stream) leaves the rest applied, the entry's XACK included. Rather than
        lose the message, send it to the dead-letter stream now, or log its fields.
        Returns ``id()`` of the outcomes concerned.
        """
        failed = [
            (o, p, r) for (o, p), r in zip(adds, results, strict=False) if isinstance(r, Exception)
        ]
        rescued: set[int] = set()
        for outcome, publish, exc in failed:
            if id(outcome) in rescued:
                continue
            rescued.add(id(outcome))
            entry = outcome.entry
            reason = str(exc).rpartition("caused error: ")[2].strip("(),'\"")
            error = f"publishing to {publish.key} failed: {reason}"
            dlq = self.group.dead_letter
            if dlq is not None and publish.key != dlq:
                dead = self._dead_letter(Outcome(entry, DEAD, [], error))
                try:
                    await self.client.xadd(
                        dead.key, dead.fields, maxlen=dead.maxlen, approximate=True
                    )
                except Exception as again:
                    error += f"; dead-lettering failed too: {again}"
                else:
                    self._key_stats[entry.key.key].dead_lettered += 1
                    self.log.error(
                        "group %s: %s from %s was acknowledged but %s; dead-lettered to %s",
                        self.name,
                        entry.id,
                        entry.key.key,
                        error,
                        dlq,
                    )
                    continue
            self.log.error(
                "group %s: %s from %s was acknowledged but %s; its fields, to send again by "
                "hand: %s",
                self.name,
                entry.id,
                entry.key.key,
                error,
                json.dumps(entry.fields),
            )
        return rescued

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
        entries = self._claimed_entries(key, claimed, counts)
        returned = {e.id for e in entries}
        missing = [i for i in counts if i not in returned]
        if missing:
            await self._ack_deleted(key, missing)
        await self._process_claimed(key, entries)

    def _claimed_entries(
        self, key: StreamKey, claimed: list[Any], counts: dict[str, int]
    ) -> list[Entry]:
        entries = []
        for item in claimed or []:
            entry_id, fields = item[0], item[1]
            if entry_id is None or fields is None:  # deleted (Redis 6.2 sends a nil)
                continue
            if isinstance(fields, list):
                fields = _pairs(fields)
            entries.append(Entry(key, entry_id, fields, counts.get(entry_id, 0) + 1))
        return entries

    async def _ack_deleted(self, key: StreamKey, missing: list[str]) -> None:
        """Acknowledge pending IDs XCLAIM gave us without an entry: trimmed or deleted.

        Redis 7 drops such IDs from the PEL itself; 6.2 moves them to us with a nil that
        names no ID. An ID that is not ours now was not claimed at all (another consumer
        took it meanwhile): it is left alone.
        """
        rows = await self.client.xpending_range(
            key.key, self.name, missing[0], missing[-1], len(missing) * 2 + 10, consumername=self.me
        )
        mine = {r["message_id"] for r in rows}
        gone = [i for i in missing if i in mine and (key.key, i) not in self._inflight]
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

    async def _process_claimed(self, key: StreamKey, entries: list[Entry]) -> None:
        if not entries:
            return
        dead = [e for e in entries if e.deliveries > self.max_deliveries]
        live = [e for e in entries if e.deliveries <= self.max_deliveries]
        if dead:
            # this claim is not a delivery to a handler: report the ones that were
            await self._commit(
                [
                    Outcome(
                        Entry(e.key, e.id, e.fields, e.deliveries - 1),
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
                and (key.key, r["message_id"]) not in self._inflight
            ][: self._capacity()]
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

    async def _autoclaim(self) -> bool:
        """XAUTOCLAIM what we have room for; True if it found some (claim again soon).

        Taking no more than the free capacity keeps claimed entries from idling in our
        backlog until yet another consumer claims them; the cursor is kept per key so a
        long PEL is walked through rather than rescanned from its start each time.
        """
        idle = int(self.spec.retry.claim_idle * 1000)
        more = False
        for key in self.keys:
            capacity = self._capacity()
            if capacity == 0:
                return True
            cursor = self._autoclaim_cursor.get(key.key, "0-0")
            reply = await self.client.xautoclaim(
                key.key, self.name, self.me, idle, cursor, count=capacity
            )
            self._autoclaim_cursor[key.key] = reply[0]
            # Redis 6.2 replies [cursor, entries], a deleted entry as a nil without its ID
            # (the next retry round finds and acknowledges it); 7.x adds the deleted IDs.
            claimed = [
                c for c in reply[1] if c[0] is not None and (key.key, c[0]) not in self._inflight
            ]
            if not claimed:
                continue
            more = True
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
            await self._process_claimed(key, self._claimed_entries(key, claimed, counts))
        return more
