"""Groups with sync calls: one driver task, calls handed to threads in chunks.

Counted by id on a real server: every message's routes ran once, every outcome was
committed, nothing is left pending; the call pool shares a thread among short calls
and gives blocking ones a thread each; a call still queued at its timeout never runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

from projects import NewProject, entries, module, none_pending, running, wait_for

from cortex_flow.flow.callables import importable_from
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import resolve
from cortex_flow.runtime.callpool import CallPool
from cortex_flow.runtime.consumer import GroupConsumer
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.stats import GroupStats
from cortex_flow.wire.groups import ensure_group

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
          - call: {function: "{M}:block", timeout: 300ms}
"""

BLOCKING = """
    import time

    ran = []

    def block(msg):
        ran.append(msg["n"])
        time.sleep(0.6)
"""


async def test_a_sync_call_still_queued_at_its_timeout_never_runs(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """One thread, four blocking calls: the first overruns, the three queued behind it
    time out without running; all four are dead-lettered as timed out."""
    config, mod = new_project(QUEUED_FLOW, BLOCKING)
    project = load_project(config)
    resolved = resolve(project.topology, "t1")
    group = resolved.groups["work"]
    with importable_from(project.base_dir):
        table = RouteTable(group, {n: s.spec for n, s in resolved.streams.items()}, frozenset())
    streams = {n: s.spec for n, s in resolved.streams.items()}
    key = f"{key_prefix}jobs"
    await ensure_group(redis_client, key, "work", "earliest")
    for n in range(4):
        await redis_client.xadd(key, {"n": str(n)})
    pool = CallPool(threads=1)
    stats = GroupStats("work", "t1")
    consumer = GroupConsumer(
        redis_client,
        group,
        table,
        streams,
        stats,
        executor=pool,
        block=0.05,
    )
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
    try:
        first = pool.call(loop, lambda _: time.sleep(0.2) or ran.append("first"), None)
        second = pool.call(loop, lambda _: ran.append("second"), None)
        await asyncio.sleep(0.05)  # the first runs, the second waits for the only thread
        assert pool.cancel(second)
        assert not pool.cancel(first)  # running: it cannot be taken back
        await first.returning()
        await asyncio.sleep(0.05)
    finally:
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
