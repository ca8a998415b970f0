"""Long calls, leases, timeouts that mean it and passing Redis errors, on real servers.

Every test counts messages by id: how often each ran, what is left pending, what went
to the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from projects import (
    end,
    lines,
    make_project,
    module,
    none_pending,
    running,
    spawn_runner,
    wait_for,
    write_module,
)
from redis_servers import PrivateRedis

LONG_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        concurrency: 8
        dead_letter: dlq
        retry: {max_deliveries: 3, backoff: {initial: 100ms, max: 1s}, claim_idle: 1s}
        routes:
          - call: {function: "{M}:handle", timeout: 1m}
"""

LONG_CALLS = """
    import asyncio

    started = []
    finished = []

    async def handle(msg):
        started.append(msg["n"])
        await asyncio.sleep(3.5)
        finished.append(msg["n"])
"""


async def _publish(client: Any, key: str, count: int) -> None:
    for n in range(count):
        await client.xadd(key, {"n": str(n)})


async def test_a_call_longer_than_claim_idle_runs_once_on_two_runners(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """A 3.5 s call under ``claim_idle: 1s`` with two runners runs once per message."""
    mod = write_module(tmp_path, LONG_CALLS)
    options = {"url": redis_url, "prefix": key_prefix, "mod": mod}
    one = make_project(tmp_path, LONG_FLOW, name="r1", **options)
    two = make_project(tmp_path, LONG_FLOW, name="r2", config_name="two.yaml", **options)
    key = f"{key_prefix}jobs"
    await _publish(redis_client, key, 12)
    async with running(one), running(two):
        handlers = module(mod)
        await wait_for(lambda: len(handlers.finished) >= 12, timeout=20, what="all 12 calls")
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="all acknowledged")
    assert Counter(handlers.started) == Counter(str(n) for n in range(12))  # each once
    assert await redis_client.xlen(f"{key_prefix}dlq") == 0


HANGING = """
    import asyncio
    import os

    async def handle(msg):
        if os.environ.get("CF_HANG"):
            await asyncio.sleep(60)
        with open({path!r}, "a") as out:
            out.write(msg["n"] + "\\n")
"""


async def test_a_runner_killed_mid_call_has_its_entries_finished_by_the_other(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """While its runner renews them, long calls are not claimed; once it is killed, the
    other runner takes them over about ``claim_idle`` later and finishes every one."""
    done = tmp_path / "done.txt"
    mod = write_module(tmp_path, HANGING.replace("{path!r}", repr(str(done))))
    options = {"url": redis_url, "prefix": key_prefix, "mod": mod}
    hung = make_project(tmp_path, LONG_FLOW, name="r1", **options)
    healthy = make_project(tmp_path, LONG_FLOW, name="r2", config_name="two.yaml", **options)
    key = f"{key_prefix}jobs"
    await _publish(redis_client, key, 6)
    process = spawn_runner(hung, tmp_path / "r1.log", env={"CF_HANG": "1"})
    try:
        await wait_for(
            lambda: _pending_of(redis_client, key, "r1", 6), timeout=20, what="r1 to take all 6"
        )
        async with running(healthy) as runner:
            await asyncio.sleep(3.0)  # three times claim_idle: r1's leases hold
            assert lines(done) == []
            assert runner.stats.groups["work"].keys[key].claimed == 0
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            await wait_for(lambda: len(lines(done)) >= 6, timeout=15, what="r2 to finish them")
            await wait_for(lambda: none_pending(redis_client, key, "work"), what="all acked")
    finally:
        end(process)
    assert sorted(lines(done), key=int) == [str(n) for n in range(6)]
    assert await redis_client.xlen(f"{key_prefix}dlq") == 0


async def _pending_of(client: Any, key: str, consumer: str, count: int) -> bool:
    try:
        rows = await client.xinfo_consumers(key, "work")
    except Exception:
        return False
    return any(r["name"] == consumer and r["pending"] >= count for r in rows)


OVERRUN_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        concurrency: 4
        dead_letter: dlq
        retry: {max_deliveries: 3, backoff: {initial: 50ms, max: 50ms}, claim_idle: 5s}
        routes:
          - call: {function: "{M}:handle", timeout: 300ms}
"""

SLOW_ONCE = """
    import threading
    import time

    runs = []  # (n, start, end) of every run
    lock = threading.Lock()

    def handle(msg):
        started = time.monotonic()
        with lock:
            first = not any(r[0] == msg["n"] for r in runs)
        time.sleep(1.2 if first or msg["n"] == "never" else 0.01)
        with lock:
            runs.append((msg["n"], started, time.monotonic()))
"""


async def test_a_timed_out_sync_call_never_overlaps_its_retry(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """A sync call past its timeout keeps its message until the thread returns; only then
    is it retried, and a message that always times out is dead-lettered as timed out."""
    mod = write_module(tmp_path, SLOW_ONCE)
    config = make_project(tmp_path, OVERRUN_FLOW, url=redis_url, prefix=key_prefix, mod=mod)
    key = f"{key_prefix}jobs"
    for n in ("0", "1", "never"):
        await redis_client.xadd(key, {"n": n})
    async with running(config):
        handlers = module(mod)
        await wait_for(
            lambda: redis_client.xlen(f"{key_prefix}dlq"), timeout=15, what="the dead letter"
        )
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="all settled")
    runs: list[tuple[str, float, float]] = handlers.runs
    for n in ("0", "1", "never"):
        mine = sorted((start, stop) for m, start, stop in runs if m == n)
        for (_, first_end), (second_start, _) in itertools.pairwise(mine):
            assert second_start >= first_end, f"message {n} ran twice at once: {mine}"
    assert Counter(m for m, _, _ in runs) == {"0": 2, "1": 2, "never": 3}
    [(_, dead)] = await redis_client.xrange(f"{key_prefix}dlq")
    assert dead["n"] == "never" and dead["dlq_deliveries"] == "3"
    assert "timed out after 0.3s" in dead["dlq_error"]


FAILING_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        dead_letter: dlq
        retry: {max_deliveries: 4, backoff: {initial: 100ms, max: 1s}, claim_idle: 5s}
        routes:
          - call: {M}:handle
"""

ALWAYS_FAILS = """
    async def handle(msg):
        raise RuntimeError("no")
"""


async def test_many_failing_messages_keep_their_backoff_schedule(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """300 messages failing on every delivery are all retried on time and dead-lettered
    after their 4th delivery (the schedule adds up to 0.7 s each)."""
    mod = write_module(tmp_path, ALWAYS_FAILS)
    config = make_project(tmp_path, FAILING_FLOW, url=redis_url, prefix=key_prefix, mod=mod)
    key, dlq = f"{key_prefix}jobs", f"{key_prefix}dlq"
    await _publish(redis_client, key, 300)
    async with running(config) as runner:
        await wait_for(
            lambda: _length_at_least(redis_client, dlq, 300), timeout=8, what="all 300 dead"
        )
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="all acked")
        stats = runner.stats.groups["work"].keys[key]
    dead = await redis_client.xrange(dlq)
    assert sorted(int(f["n"]) for _, f in dead) == list(range(300))
    assert {f["dlq_deliveries"] for _, f in dead} == {"4"}
    # every failed attempt counts, the 4th (dead-lettered) one too: failed_total
    assert (stats.failed, stats.dead_lettered) == (1200, 300)


async def _length_at_least(client: Any, key: str, count: int) -> bool:
    return int(await client.xlen(key)) >= count


OUT_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      out: {key: "{P}out"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        concurrency: 16
        dead_letter: dlq
        retry: {max_deliveries: 3, backoff: {initial: 100ms, max: 500ms}, claim_idle: 2s}
        routes:
          - {call: "{M}:handle", continue: true}
          - to: out
"""

PASS = """
    async def handle(msg):
        pass
"""

GATED = """
    import asyncio

    gate = asyncio.Event()

    async def handle(msg):
        await gate.wait()
"""


@pytest.fixture
def private_redis_server(tmp_path: Path) -> Any:
    with PrivateRedis(tmp_path / "oom-redis") as server:
        yield server


async def test_out_of_memory_loses_and_dead_letters_nothing(
    tmp_path: Path, private_redis_server: PrivateRedis
) -> None:
    """While Redis refuses writes (maxmemory), outcomes are kept and committed once it
    accepts them: every message published once, none dead-lettered, none failed."""
    url = private_redis_server.url
    mod = write_module(tmp_path, GATED)
    config = make_project(tmp_path, OUT_FLOW, url=url, prefix="oom:", mod=mod)
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        await _publish(client, "oom:jobs", 400)
        await client.xadd("oom:out", {"n": "seed"})  # the target exists: only writes fail
        async with running(config) as runner:
            group = runner.stats.groups["work"]
            await wait_for(lambda: runner.consumers["work"].held > 0, what="messages held")
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", str(used))
            module(mod).gate.set()  # handlers finish now; their commits meet OOM
            await wait_for(lambda: group.redis_errors.get("oom", 0) > 0, what="OOM refusals")
            await asyncio.sleep(1.0)  # refused for a while: nothing may be given up meanwhile
            assert await client.xlen("oom:dlq") == 0
            await client.config_set("maxmemory", "0")
            await wait_for(lambda: _length_at_least(client, "oom:out", 401), what="published")
            await wait_for(lambda: none_pending(client, "oom:jobs", "work"), what="all acked")
            stats = group.keys["oom:jobs"]
            assert (stats.failed, stats.dead_lettered, stats.processed) == (0, 0, 400)
        published = [f["n"] for _, f in await client.xrange("oom:out") if f["n"] != "seed"]
        assert Counter(published) == Counter(str(n) for n in range(400))  # each once
        assert await client.xlen("oom:dlq") == 0
    finally:
        await client.aclose()


async def test_readiness_follows_a_redis_that_stops_answering(
    tmp_path: Path, private_redis_server: PrivateRedis
) -> None:
    """A Redis that hangs (SIGSTOP) makes ``connected`` false within a few seconds; it
    turns true again once the server answers, and messages flow again."""
    mod = write_module(tmp_path, PASS)
    config = make_project(tmp_path, OUT_FLOW, url=private_redis_server.url, prefix="h:", mod=mod)
    pid = private_redis_server.pid
    assert pid is not None
    async with running(config) as runner:
        assert runner.stats.connected and runner.ready()[0]
        os.kill(pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: not runner.stats.connected, timeout=8, what="not connected")
            assert not runner.ready()[0]
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_for(lambda: runner.stats.connected, timeout=8, what="connected again")
        client = aioredis.Redis.from_url(private_redis_server.url, decode_responses=True)
        try:
            await client.xadd("h:jobs", {"n": "after"})
            await wait_for(lambda: _length_at_least(client, "h:out", 1), what="it flows again")
        finally:
            await client.aclose()


SWAP_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
    groups:
      work:
        stream: jobs
        routes:
          - call: {function: "{M}:ROUTE", inline: INLINE}
"""

TWO_KINDS = """
    handled = []

    def quick(msg):
        handled.append(("inline", msg["n"]))

    async def slow(msg):
        handled.append(("async", msg["n"]))
"""


async def test_a_route_swap_from_inline_to_async_calls_still_commits(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """A route-only reload that turns an inline group into one with async calls goes on
    committing: every message after the swap is handled once and acknowledged."""
    mod = write_module(tmp_path, TWO_KINDS)
    flow = SWAP_FLOW.replace("ROUTE", "quick").replace("INLINE", "true")
    config = make_project(tmp_path, flow, url=redis_url, prefix=key_prefix, mod=mod)
    key = f"{key_prefix}jobs"
    async with running(config) as runner:
        handled = module(mod).handled
        await redis_client.xadd(key, {"n": "0"})
        await wait_for(lambda: len(handled) == 1, what="the inline call")
        swapped = SWAP_FLOW.replace("ROUTE", "slow").replace("INLINE", "false")
        make_project(tmp_path, swapped, url=redis_url, prefix=key_prefix, mod=mod)
        result = await runner.reload("test")
        assert result["outcome"] == "applied", result
        for n in range(1, 51):
            await redis_client.xadd(key, {"n": str(n)})
        await wait_for(lambda: len(handled) == 51, what="50 async calls")
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="all acknowledged")
    assert handled == [("inline", "0")] + [("async", str(n)) for n in range(1, 51)]
