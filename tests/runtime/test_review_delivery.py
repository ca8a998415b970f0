"""Delivery corner cases against a real Redis: failed publishes, exact delivery counts,
paged recovery, passing script errors, permanent template errors, stopped successors,
entries failed for good with no dead_letter."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from projects import NewProject, entries, module, none_pending, running, wait_for
from redis.crc import key_slot
from redis.exceptions import ResponseError
from redis_servers import PrivateRedis

from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import Resolved, resolve
from cortex_flow.runtime.commit import Committer
from cortex_flow.runtime.consumer import GroupConsumer
from cortex_flow.runtime.delivery import ACK, DEAD, Entry, Outcome
from cortex_flow.runtime.pending import PendingWork
from cortex_flow.runtime.reader import GroupReader
from cortex_flow.runtime.routes import Publish, RouteTable
from cortex_flow.runtime.stats import GroupStats, KeyStats
from cortex_flow.wire.groups import ensure_group

LOG = logging.getLogger("cortex_flow.consumer")


def _resolve(new_project: NewProject, flows: str, handlers: str = "") -> tuple[Resolved, str]:
    config, mod = new_project(flows, handlers)
    return resolve(load_project(config).topology, "t1"), mod


def _streams(resolved: Resolved) -> dict[str, Any]:
    return {n: s.spec for n, s in resolved.streams.items()}


async def _read(client: Any, key: str, consumer: str, count: int) -> list[tuple[str, Any]]:
    reply = await client.xreadgroup("work", consumer, {key: ">"}, count=count)
    return list(reply[0][1]) if reply else []


async def _pending_ids(client: Any, key: str) -> list[str]:
    rows = await client.xpending_range(key, "work", "-", "+", 1000)
    return [r["message_id"] for r in rows]


def _other_slot(stem: str, key: str) -> str:
    """A key starting with ``stem`` in another cluster slot than ``key``."""
    return next(
        f"{stem}{n}"
        for n in range(100)
        if key_slot(f"{stem}{n}".encode()) != key_slot(key.encode())
    )


# --- 1. publish-then-ack (a cluster, keys in different slots) -------------------------------

COMMIT_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        DEAD_LETTER
        routes:
          - drop: true
"""


@pytest.mark.parametrize("dead_letter", [False, True])
async def test_cluster_commit_acks_a_refused_publish_only_once_dead_lettered(
    new_project: NewProject, redis_client: Any, key_prefix: str, dead_letter: bool
) -> None:
    """Publish-then-ack: a refused publish is dead-lettered and acked, or stays pending."""
    flows = COMMIT_FLOW.replace("DEAD_LETTER", "dead_letter: dlq" if dead_letter else "")
    resolved, _ = _resolve(new_project, flows)
    group = resolved.groups["work"]
    source = group.keys[0].key
    # targets in other slots than the source: the publish-then-ack path
    bad, good = (_other_slot(f"{key_prefix}{name}", source) for name in ("bad", "good"))
    await redis_client.set(bad, "not a stream")
    await ensure_group(redis_client, source, "work", "earliest")
    first = await redis_client.xadd(source, {"n": "1"})
    second = await redis_client.xadd(source, {"n": "2"})
    await _read(redis_client, source, "t1", 10)
    stats = {source: KeyStats()}
    committer = Committer(redis_client, group, _streams(resolved), stats, cluster=True, log=LOG)
    key = group.keys[0]
    await committer.commit(
        [
            Outcome(Entry(key, first, {"n": "1"}, 1), ACK, [Publish(bad, {"n": "1"})]),
            Outcome(Entry(key, second, {"n": "2"}, 1), ACK, [Publish(good, {"n": "2"})]),
        ]
    )
    assert [f for _, f in await entries(redis_client, good)] == [{"n": "2"}]
    if dead_letter:
        assert await _pending_ids(redis_client, source) == []
        [(_, dead)] = await entries(redis_client, f"{key_prefix}dlq")
        assert dead["dlq_id"] == first and "WRONGTYPE" in dead["dlq_error"]
        assert stats[source].dead_lettered == 1
    else:
        assert await _pending_ids(redis_client, source) == [first]  # retried, not lost
    assert stats[source].processed == 1


# --- 2. claimed entries get their own delivery count ------------------------------------

CLAIM_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        dead_letter: dlq
        retry: {max_deliveries: 3, backoff: {initial: 100ms}, claim_idle: 200ms}
        routes:
          - drop: true
"""


class _Recorder:
    """PendingWork's dispatch and commit, recorded; ``room`` is its capacity."""

    def __init__(self, room: int = 100) -> None:
        self.room = room
        self.dispatched: list[Entry] = []
        self.committed: list[Outcome] = []

    async def dispatch(self, batch: list[Entry]) -> None:
        self.dispatched.extend(batch)

    async def commit(self, outcomes: list[Outcome]) -> None:
        self.committed.extend(outcomes)

    def work(self, client: Any, resolved: Resolved, stats: dict[str, KeyStats]) -> PendingWork:
        return PendingWork(
            client,
            resolved.groups["work"],
            stats,
            inflight=set(),
            capacity=lambda: self.room,
            dispatch=self.dispatch,
            commit=self.commit,
            log=LOG,
        )


async def test_claimed_entries_get_their_exact_delivery_count(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """Our own busy entries between two claimed ones do not hide a claimed entry's count."""
    resolved, _ = _resolve(new_project, CLAIM_FLOW)
    key = resolved.groups["work"].keys[0].key
    await ensure_group(redis_client, key, "work", "earliest")
    first = await redis_client.xadd(key, {"n": "first"})
    for n in range(30):
        await redis_client.xadd(key, {"n": str(n)})
    last = await redis_client.xadd(key, {"n": "last"})
    await _read(redis_client, key, "ghost", 1)  # first
    await _read(redis_client, key, "t1", 30)  # ours, just delivered: not idle
    await _read(redis_client, key, "ghost", 1)  # last
    # the ghost crashed long ago; `last` already had all its deliveries
    await redis_client.xclaim(key, "work", "ghost", 0, [first], idle=5000, retrycount=1)
    await redis_client.xclaim(key, "work", "ghost", 0, [last], idle=5000, retrycount=3)
    recorder = _Recorder()
    stats = {key: KeyStats()}
    await recorder.work(redis_client, resolved, stats).autoclaim()
    assert [(e.id, e.deliveries) for e in recorder.dispatched] == [(first, 2)]
    assert [(o.entry.id, o.kind, o.entry.deliveries) for o in recorder.committed] == [
        (last, DEAD, 3)
    ]
    assert stats[key].claimed == 2


# --- 3. own pending entries are taken back a page at a time -----------------------------

SLOW_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
    groups:
      work:
        stream: jobs
        concurrency: 3
        batch: 50
        routes:
          - call: {M}:handle
"""

SLOW_HANDLERS = """
    import asyncio
    handled = []

    async def handle(msg):
        await asyncio.sleep(0.01)
        handled.append(msg["n"])
"""


async def test_own_pending_entries_are_taken_back_as_slots_free(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """After a crash with 60 entries pending, no more than `concurrency` are claimed ahead."""
    config, mod = new_project(SLOW_FLOW, SLOW_HANDLERS)
    key = f"{key_prefix}jobs"
    await ensure_group(redis_client, key, "work", "earliest")
    for n in range(60):
        await redis_client.xadd(key, {"n": str(n)})
    await _read(redis_client, key, "t1", 60)  # the previous run of t1 held them all
    async with running(config) as runner:
        consumer = runner.consumers["work"]
        handled = module(mod).handled
        held = 0
        deadline = time.monotonic() + 20
        while len(handled) < 60 and time.monotonic() < deadline:
            held = max(held, consumer.held)
            await asyncio.sleep(0.002)
        assert sorted(map(int, handled)) == list(range(60))
        assert held <= 2 * 3  # concurrency 3 running, a window as large again waiting
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="all acked")


# --- 4. a passing script error is raised, not a reason to give scripts up ---------------

PRIORITY_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks:{{ priority }}", priorities: [high, low]}
      out: {key: "{P}out"}
    groups:
      work:
        stream: tasks
        priority: weighted  # the read script's path (strict reads need no script)
        routes:
          - to: out
"""

SPIN = """
local t0 = redis.call('TIME')
while true do
  local t = redis.call('TIME')
  if (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1]) * 1000 then break end
end
return 1
"""


async def _setup_priority(
    new_project: NewProject, client: Any, key_prefix: str
) -> tuple[Resolved, Committer, GroupReader, list[Outcome]]:
    resolved, _ = _resolve(new_project, PRIORITY_FLOW)
    group = resolved.groups["work"]
    for key in group.keys:
        await ensure_group(client, key.key, "work", "earliest")
    high = group.keys[0]
    entry_id = await client.xadd(high.key, {"n": "1"})
    await _read(client, high.key, "t1", 1)
    stats = {k.key: KeyStats() for k in group.keys}
    committer = Committer(client, group, _streams(resolved), stats, cluster=False, log=LOG)
    reader = GroupReader(client, group, block_ms=50, cluster=False, sleep=asyncio.sleep, log=LOG)
    target = f"{key_prefix}out"
    outcome = Outcome(Entry(high, entry_id, {"n": "1"}, 1), ACK, [Publish(target, {"n": "1"})])
    return resolved, committer, reader, [outcome]


async def test_a_busy_server_does_not_turn_scripts_off(
    new_project: NewProject, private_redis: PrivateRedis, key_prefix: str
) -> None:
    """BUSY (like OOM or MISCONF) passes: raised to the loop's backoff, the scripts stay."""
    client = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    spinner = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        _, committer, reader, outcomes = await _setup_priority(new_project, client, key_prefix)
        await client.config_set("lua-time-limit", 50)
        await client.xadd(f"{key_prefix}tasks:low", {"n": "2"})
        busy = asyncio.create_task(spinner.eval(SPIN, 0, 1500))
        await asyncio.sleep(0.3)
        with pytest.raises(ResponseError, match="BUSY"):
            await committer.commit(outcomes)
        with pytest.raises(ResponseError, match="BUSY"):
            await reader.fetch(10, block=False)
        await busy
        assert committer._script is not None and reader._script is not None
        await committer.commit(outcomes)  # the script commits it now
        assert await client.xlen(f"{key_prefix}out") == 1
        assert await _pending_ids(client, f"{key_prefix}tasks:high") == []
        [got] = await reader.fetch(10, block=False)
        assert got.fields == {"n": "2"}
    finally:
        await spinner.aclose()
        await client.aclose()


async def test_scripts_fall_back_where_the_server_cannot_run_them(
    new_project: NewProject, tmp_path: Path, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No EVALSHA: one warning saying what changes, then MULTI/EXEC and key-by-key reads."""
    with PrivateRedis(tmp_path / "noscripts", args=("--rename-command", "EVALSHA", "")) as server:
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            _, committer, reader, outcomes = await _setup_priority(new_project, client, key_prefix)
            await client.xadd(f"{key_prefix}tasks:low", {"n": "2"})
            with caplog.at_level(logging.WARNING, logger=LOG.name):
                await committer.commit(outcomes)
                [got] = await reader.fetch(10, block=False)
            assert got.fields == {"n": "2"}
            assert await client.xlen(f"{key_prefix}out") == 1
            assert await _pending_ids(client, f"{key_prefix}tasks:high") == []
            assert committer._script is None and reader._script is None
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("publishes are now committed with MULTI/EXEC" in w for w in warnings)
            assert any("keys are now read one by one" in w for w in warnings)
        finally:
            await client.aclose()


# --- 5. a `when` or template that cannot be evaluated is dead-lettered at once -------------

TEMPLATE_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      out: {key: "{P}out"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        dead_letter: dlq
        retry: {max_deliveries: 3, backoff: {initial: 50ms, max: 50ms}}
        routes:
          - when: "msg.kind == 'cmp' and msg.n > 3"
            to: out
          - when: "msg.kind == 'set'"
            to: out
            set: {x: "{{ msg.n + 1 }}"}
          - drop: true
"""


async def test_when_and_template_errors_are_dead_lettered_at_once(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """A TypeError in `when` or `set` fails the same way every time: no retries."""
    config, _ = new_project(TEMPLATE_FLOW)
    key, dlq = f"{key_prefix}jobs", f"{key_prefix}dlq"
    async with running(config):
        await redis_client.xadd(key, {"kind": "cmp", "n": "5"})
        await redis_client.xadd(key, {"kind": "set", "n": "5"})
        await redis_client.xadd(key, {"kind": "other"})
        await wait_for(lambda: _length_at_least(redis_client, dlq, 2), what="2 dead letters")
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="all acked")
    dead = {f["kind"]: f for _, f in await entries(redis_client, dlq)}
    assert set(dead) == {"cmp", "set"}
    assert {f["dlq_deliveries"] for f in dead.values()} == {"1"}
    hint = "message fields are strings on a raw stream; convert, e.g. msg.n | int"
    assert "routes[0]: when" in dead["cmp"]["dlq_error"] and "TypeError" in dead["cmp"]["dlq_error"]
    assert hint in dead["cmp"]["dlq_error"]
    assert "routes[1]: set.x failed: TypeError" in dead["set"]["dlq_error"]
    assert await redis_client.xlen(f"{key_prefix}out") == 0


async def _length_at_least(client: Any, key: str, n: int) -> bool:
    return int(await client.xlen(key)) >= n


# --- 6. a successor stopped while waiting for its predecessor takes no work -------------


async def test_successor_stopped_while_waiting_for_its_predecessor_reads_nothing(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    resolved, _ = _resolve(new_project, COMMIT_FLOW.replace("DEAD_LETTER", ""))
    group = resolved.groups["work"]
    key = group.keys[0].key
    await ensure_group(redis_client, key, "work", "earliest")
    for n in range(3):
        await redis_client.xadd(key, {"n": str(n)})
    predecessor = asyncio.Event()
    consumer = GroupConsumer(
        redis_client,
        group,
        RouteTable(group, _streams(resolved), frozenset()),
        _streams(resolved),
        GroupStats("work", "t1"),
        predecessor=predecessor,
        block=0.05,
    )
    consumer.start()
    stopping = asyncio.create_task(consumer.stop(5.0))
    await asyncio.sleep(0.05)
    predecessor.set()  # the predecessor finished; this one is being stopped meanwhile
    assert await stopping
    [info] = await redis_client.xinfo_groups(key)
    assert info["last-delivered-id"] == "0-0"  # nothing read: the next consumer reads it all
    assert info["pending"] == 0


# --- 7 and 8. no dead_letter: failed for good is left alone; unmatched is said ----------

NO_DLQ_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
    groups:
      work:
        stream: jobs
        retry: {max_deliveries: 3, backoff: {initial: 20ms, max: 20ms}, claim_idle: 100ms}
        routes:
          - when: "msg.kind == 'fail'"
            call: {function: "{M}:fail", timeout: 50ms}
          - when: "msg.kind == 'cmp' and msg.n > 3"
            drop: true
          - when: "msg.kind == 'ok'"
            drop: true
"""

FAIL_HANDLERS = """
    calls = []
    def fail(msg):
        calls.append(msg["kind"])
        raise ValueError("always")
"""


async def test_no_dead_letter_failed_for_good_stays_pending_and_is_not_claimed_again(
    new_project: NewProject, redis_client: Any, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Reported once and counted; never run again; unmatched acks are said.

    XAUTOCLAIM may still move such an entry (bumping its count) once it idles past
    claim_idle: it stays pending, and is never handled again.
    """
    config, mod = new_project(NO_DLQ_FLOW, FAIL_HANDLERS)
    key = f"{key_prefix}jobs"
    with caplog.at_level(logging.INFO, logger=LOG.name):
        async with running(config) as runner:
            failing = await redis_client.xadd(key, {"kind": "fail"})
            permanent = await redis_client.xadd(key, {"kind": "cmp", "n": "5"})
            for _ in range(3):
                await redis_client.xadd(key, {"kind": "unknown"})
            stats = runner.stats.groups["work"].keys[key]
            await wait_for(lambda: stats.stuck == 2, what="both reported as stuck")
            await asyncio.sleep(0.6)  # a claim_idle and many backoffs: nothing claims them
            rows = await redis_client.xpending_range(key, "work", "-", "+", 10)
            assert {r["message_id"] for r in rows} == {failing, permanent}
            assert module(mod).calls == ["fail"] * 3  # max_deliveries, then never again
            assert stats.stuck == 2 and stats.unmatched == 3
    records = [r for r in caplog.records if r.name == LOG.name]
    errors = [r.getMessage() for r in records if r.levelno == logging.ERROR]
    assert len([e for e in errors if failing in e]) == 1, errors
    assert len([e for e in errors if permanent in e]) == 1, errors
    retries = [r.getMessage() for r in records if "will retry" in r.getMessage()]
    assert len(retries) == 2 and all(m.endswith("will retry in 20ms") for m in retries)
    unmatched = [r.getMessage() for r in records if "matched no route" in r.getMessage()]
    assert unmatched == [
        "group work: 1 message(s) matched no route and were acknowledged; add a final "
        "`drop: true` route to make that explicit or a dead_letter to keep them"
    ]
