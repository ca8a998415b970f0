"""Groups with sync calls: one driver task, calls handed to threads in chunks.

Counted by id on a real server: every message's routes ran once, every outcome was
committed, nothing is left pending; the call pool shares a thread among short calls
and gives blocking ones a thread each; a call still queued at its timeout never runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any, cast

from projects import NewProject, entries, module, none_pending, running, wait_for

from cortex_flow.flow.callables import importable_from
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import StreamKey, resolve
from cortex_flow.runtime.callpool import CallPool
from cortex_flow.runtime.consumer import GroupConsumer
from cortex_flow.runtime.delivery import Entry
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.stats import GroupStats
from cortex_flow.runtime.threaded import ThreadedDriver
from cortex_flow.wire.groups import ensure_group

LOG = logging.getLogger("test_threaded")

MIXED_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      done: {key: "{P}done"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        dead_letter: dlq
        retry: {max_deliveries: 3, backoff: {initial: 50ms, max: 100ms}}
        routes:
          - {call: "{M}:sync_part", continue: true}
          - {call: "{M}:async_part", continue: true}
          - when: "msg.n | int % 10 == 3"
            call: "{M}:fails_once"
            continue: true
          - to: done
"""

MIXED_HANDLERS = """
    import asyncio
    import threading

    sync_runs = []
    async_runs = []
    failed = set()
    threads = set()

    def sync_part(msg):
        threads.add(threading.current_thread().name)
        sync_runs.append(msg["n"])

    async def async_part(msg):
        await asyncio.sleep(0)
        async_runs.append(msg["n"])

    def fails_once(msg):
        if msg["n"] not in failed:
            failed.add(msg["n"])
            raise RuntimeError("first time")
"""


async def test_sync_async_and_to_routes_of_one_table_each_run_and_commit(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """A sync call, an async call, a failing-once sync call and a publish in one table."""
    config, mod = new_project(MIXED_FLOW, MIXED_HANDLERS)
    key = f"{key_prefix}jobs"
    ids = {str(n): await redis_client.xadd(key, {"n": str(n)}) for n in range(300)}
    async with running(config):
        await wait_for(
            lambda: _length(redis_client, f"{key_prefix}done", 300), what="300 published"
        )
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="all acked")
    handlers = module(mod)
    retried = {str(n) for n in range(300) if n % 10 == 3}
    # a failed delivery runs its earlier routes again: at-least-once, counted exactly
    expected = Counter({n: 2 if n in retried else 1 for n in ids})
    assert Counter(handlers.sync_runs) == expected
    assert Counter(handlers.async_runs) == expected
    assert handlers.failed == retried
    done = await entries(redis_client, f"{key_prefix}done")
    published = Counter(fields["n"] for _, fields in done)
    assert published == Counter(list(ids))  # each once: a failed delivery publishes nothing
    assert await redis_client.xlen(f"{key_prefix}dlq") == 0
    assert all(name.startswith("cortex-call") for name in handlers.threads)


async def _length(client: Any, key: str, n: int) -> bool:
    return int(await client.xlen(key)) >= n


# one sync call with a timeout of TIMEOUT, four at a time, no retry
QUEUED_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        concurrency: 4
        dead_letter: dlq
        retry: {max_deliveries: 1}
        routes:
          - call: {function: "{M}:block", timeout: TIMEOUT}
"""

BLOCKING = """
    import time

    ran = []

    def block(msg):
        ran.append(msg["n"])
        time.sleep(0.6)
"""


async def _consumer(
    config: Any, redis_client: Any, key_prefix: str, pool: CallPool, stats: GroupStats, n: int
) -> GroupConsumer:
    """A consumer of group ``work`` of ``config`` on ``n`` new entries, sync calls in ``pool``."""
    project = load_project(config)
    resolved = resolve(project.topology, "t1")
    group = resolved.groups["work"]
    with importable_from(project.base_dir):
        table = RouteTable(group, {n: s.spec for n, s in resolved.streams.items()}, frozenset())
    streams = {n: s.spec for n, s in resolved.streams.items()}
    key = f"{key_prefix}jobs"
    await ensure_group(redis_client, key, "work", "earliest")
    for i in range(n):
        await redis_client.xadd(key, {"n": str(i)})
    return GroupConsumer(redis_client, group, table, streams, stats, executor=pool, block=0.05)


async def test_a_sync_call_still_queued_at_its_timeout_never_runs(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """One thread, four blocking calls: the first overruns, the three queued behind it
    time out without running; all four are dead-lettered as timed out."""
    config, mod = new_project(QUEUED_FLOW.replace("TIMEOUT", "300ms"), BLOCKING)
    key = f"{key_prefix}jobs"
    pool = CallPool(threads=1)
    stats = GroupStats("work", "t1")
    consumer = await _consumer(config, redis_client, key_prefix, pool, stats, 4)
    consumer.start()
    try:
        await wait_for(lambda: _length(redis_client, f"{key_prefix}dlq", 4), what="4 dead letters")
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="all acked")
    finally:
        await consumer.stop(5.0)
        pool.shutdown()
    assert module(mod).ran == ["0"]
    errors = sorted(f["dlq_error"] for _, f in await entries(redis_client, f"{key_prefix}dlq"))
    assert all("timed out after 0.3s" in e for e in errors), errors
    assert sum("ran on for" in e for e in errors) == 1  # the one that ran, once it returned
    assert stats.overrunning == 0


GATED = """
    import threading

    gate = threading.Event()
    ran = []

    def block(msg):
        ran.append(msg["n"])
        gate.wait(30)
"""


async def test_a_driver_cut_off_at_a_stop_leaves_no_queued_call_to_run(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """A stop whose grace runs out: the calls still queued in the shared pool never run
    (a successor may be running those entries by then)."""
    config, mod = new_project(QUEUED_FLOW.replace("TIMEOUT", "30s"), GATED)
    pool = CallPool(threads=1)
    consumer = await _consumer(config, redis_client, key_prefix, pool, GroupStats("work", "t1"), 4)
    handlers = module(mod)
    consumer.start()
    try:
        await wait_for(lambda: handlers.ran == ["0"], what="the first call running")
        assert not await consumer.stop(0.2)  # three calls wait behind it for the only thread
        handlers.gate.set()
        # queued after them: had they stayed in the queue, they would run first
        await pool.call(asyncio.get_running_loop(), lambda _: None, None).returning()
    finally:
        handlers.gate.set()
        pool.shutdown()
    assert handlers.ran == ["0"]


async def test_an_overrunning_call_cut_off_at_a_stop_leaves_the_gauge_when_it_returns(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """``overrunning`` counts the call until its thread returns, even after its driver ended."""
    config, mod = new_project(QUEUED_FLOW.replace("TIMEOUT", "100ms"), GATED)
    pool = CallPool(threads=1)
    stats = GroupStats("work", "t1")
    consumer = await _consumer(config, redis_client, key_prefix, pool, stats, 1)
    handlers = module(mod)
    consumer.start()
    try:
        await wait_for(lambda: stats.overrunning == 1, what="the call overrunning")
        assert not await consumer.stop(0.2)
        assert stats.overrunning == 1  # its thread still runs
        handlers.gate.set()
        await wait_for(lambda: stats.overrunning == 0, what="the gauge back to 0")
    finally:
        handlers.gate.set()
        pool.shutdown()


class _Steps:
    """A stand-in handler: each entry's one sync call (``routes[entry.id]``), then its
    outcome as ``(id, "ok")`` or ``(id, error class name)``."""

    name = "work"
    table = SimpleNamespace(only_call=None)  # steps for every entry
    max_stuck_calls = 64  # as many as the drivers' concurrency: never held back here

    def __init__(self, routes: dict[str, Any]) -> None:
        self.routes = routes
        self.overruns: list[str] = []
        self.overrunning = 0

    def steps(self, entry: Entry) -> Any:
        if entry.id in self.routes:
            try:
                yield self.routes[entry.id], entry.fields, None
            except Exception as exc:
                return entry.id, type(exc).__name__
        return entry.id, "ok"

    def overrun_started(self, route: Any, entry: Entry, stuck: int = 0) -> None:
        self.overruns.append(entry.id)
        self.overrunning += 1

    def overrun_ended(self, stuck: int = 0) -> None:
        self.overrunning -= 1


def _sync_route(fn: Any) -> Any:
    return SimpleNamespace(action="call", is_async=False, fn=fn, timeout=0.5, label="r")


def _queue(ids: list[str]) -> Any:
    key = StreamKey("jobs", "jobs")
    waiting = [Entry(key, i, {}, 1) for i in ids]
    return lambda: waiting.pop(0) if waiting else None


async def test_a_call_returned_in_time_but_not_handed_back_yet_is_not_overrun() -> None:
    """A call whose thread returned before its deadline, its result still held by the
    thread (busy with the next call), succeeds: it is neither overrun nor retried."""
    pool = CallPool(threads=1)
    loop = asyncio.get_running_loop()
    started, release = threading.Event(), threading.Event()

    def slow(_: Any) -> None:
        started.set()
        release.wait(30)

    handler = _Steps({"1-0": _sync_route(lambda _: None), "1-1": _sync_route(slow)})
    outcomes: list[Any] = []
    driver = ThreadedDriver(
        cast(Any, handler), pool, 4, _queue(["1-0", "1-1"]), outcomes.append, print, LOG
    )
    task = asyncio.create_task(driver.run())
    try:
        await asyncio.sleep(0)  # the driver's first pass: both calls to the thread
        # blocks the loop: the first call returned (its result not handed back: the
        # thread went on to the next call at once) and the second runs
        assert started.wait(10)
        assert driver.in_flight == 2
        driver._expire(loop.time() + 1.0)  # both past their 0.5 s deadline
        assert handler.overruns == ["1-1"]
        release.set()
        await asyncio.wait_for(task, 10)
    finally:
        release.set()
        pool.shutdown()
    assert sorted(outcomes) == [("1-0", "ok"), ("1-1", "Overran")]
    assert handler.overrunning == 0


async def test_deadlines_of_settled_calls_do_not_pile_up_behind_a_long_one() -> None:
    """One call runs long while hundreds of others come and go: the deadlines kept stay
    bounded by the concurrency, not by the calls made."""
    pool = CallPool(threads=2)
    release = threading.Event()
    ids = [f"1-{i}" for i in range(400)]
    routes = {i: _sync_route(lambda _: None) for i in ids[1:]}
    routes[ids[0]] = _sync_route(lambda _: release.wait(30))
    handler = _Steps(routes)
    outcomes: list[Any] = []
    driver = ThreadedDriver(cast(Any, handler), pool, 4, _queue(ids), outcomes.append, print, LOG)
    for route in routes.values():
        route.timeout = 60.0
    task = asyncio.create_task(driver.run())
    try:
        await wait_for(lambda: len(outcomes) == 399, what="the short calls done")
        kept = sum(len(queue) for queue in driver._deadlines.values())
        assert kept <= 2 * 4 + 64, kept
        release.set()
        await asyncio.wait_for(task, 10)
    finally:
        release.set()
        pool.shutdown()
    assert len(outcomes) == 400


async def test_an_outcome_that_cannot_be_finished_leaves_the_flight_once() -> None:
    """``finish`` raising: the entry is given up once and the driver still ends."""
    pool = CallPool(threads=1)
    dropped: list[Entry] = []

    def finish(outcome: Any) -> None:
        raise RuntimeError("the outbox is gone")

    driver = ThreadedDriver(
        cast(Any, _Steps({})), pool, 4, _queue(["1-0", "1-1"]), finish, dropped.append, LOG
    )
    try:
        await asyncio.wait_for(driver.run(), 10)
    finally:
        pool.shutdown()
    assert driver.in_flight == 0
    assert [e.id for e in dropped] == ["1-0", "1-1"]


async def test_short_calls_share_a_thread_and_blocking_ones_get_one_each() -> None:
    pool = CallPool(threads=16)
    loop = asyncio.get_running_loop()
    names: set[str] = set()

    def quick(n: int) -> int:
        names.add(threading.current_thread().name)
        return n

    try:
        for _ in range(20):  # passes of 50 calls, as a driver makes them
            waiters = [pool.call(loop, quick, n).waiter for n in range(50)]
            assert await asyncio.gather(*waiters) == list(range(50))  # type: ignore[arg-type]
        assert len(names) <= 2, names
        began = time.monotonic()
        blocking = [pool.call(loop, lambda _: time.sleep(0.3), None).waiter for _ in range(12)]
        await asyncio.gather(*blocking)  # type: ignore[arg-type]
        assert time.monotonic() - began < 1.5  # in parallel, not 12 x 0.3 s one after another
        assert pool.started >= 12
    finally:
        pool.shutdown()


async def test_a_queued_call_taken_back_never_runs() -> None:
    pool = CallPool(threads=1)
    loop = asyncio.get_running_loop()
    ran: list[str] = []
    started, release = threading.Event(), threading.Event()

    def first_call(_: Any) -> None:
        started.set()
        release.wait(10)
        ran.append("first")

    try:
        first = pool.call(loop, first_call, None)
        second = pool.call(loop, lambda _: ran.append("second"), None)
        await wait_for(started.is_set, what="the first call running")
        assert pool.cancel(second)  # it waits for the only thread
        assert not pool.cancel(first)  # running: it cannot be taken back
        release.set()
        await first.returning()
        # queued after the second: had it stayed in the queue, it would run first
        await pool.call(loop, lambda _: None, None).returning()
    finally:
        release.set()
        pool.shutdown()
    assert ran == ["first"]


COUNTED_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs:{{ priority }}", priorities: [high, low]}
    groups:
      work:
        stream: jobs
        retry: {max_deliveries: 3, backoff: {initial: 50ms, max: 100ms}}
        routes:
          - call: {function: "{M}:flaky", inline: true}
"""

FLAKY = """
    seen = set()

    def flaky(msg):
        if int(msg["n"]) % 4 == 0 and msg["id"] not in seen:
            seen.add(msg["id"])
            raise RuntimeError("first time")
"""


async def test_acknowledgements_are_counted_per_key_with_their_retries(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """Batches of plain acknowledgements count processed and retried on each key."""
    config, _ = new_project(COUNTED_FLOW, FLAKY)
    for level, count in (("high", 40), ("low", 60)):
        for n in range(count):
            await redis_client.xadd(f"{key_prefix}jobs:{level}", {"n": str(n), "id": f"{level}{n}"})
    async with running(config) as runner:
        stats = runner.stats.groups["work"].keys
        for level, count in (("high", 40), ("low", 60)):
            key = f"{key_prefix}jobs:{level}"
            await wait_for(lambda k=key, c=count: stats[k].processed == c, what=f"{level} done")
            await wait_for(lambda k=key: none_pending(redis_client, k, "work"), what="acked")
            assert stats[key].retried == count // 4  # each failed once, then succeeded
            assert stats[key].failed == count // 4
