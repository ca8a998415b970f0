"""Flow control across three runner processes: a shared rate, a cap on handlers in
flight, and dedup; counted by message against a real server."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from projects import end, make_project, spawn_runner, wait_for, write_module

FAST = ", duty_lease: 1s, heartbeat_interval: 500ms"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        end(process)


def _three(tmp_path: Path, flows: str, url: str, prefix: str, mod: str, started: list[Any]) -> None:
    for name in ("r1", "r2", "r3"):
        config = make_project(
            tmp_path,
            flows,
            url=url,
            prefix=prefix,
            mod=mod,
            name=name,
            runner_extra=FAST,
            config_name=f"{name}.yaml",
        )
        started.append(
            spawn_runner(config, tmp_path / f"{name}.log", env={"PYTHONPATH": str(tmp_path)})
        )


async def _length(client: Any, key: str, n: int) -> bool:
    return int(await client.xlen(key)) >= n


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


RATE_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      done: {key: "{P}done"}
    groups:
      work:
        stream: tasks
        rate_limit: {rate: 20/s, burst: 5}
        routes:
          - to: done
"""


async def test_three_runners_share_one_rate(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str, processes: list[Any]
) -> None:
    """A backlog of 300 under rate 20/s read by three runners: over 10 s of steady flow
    the handled rate (by the server's entry IDs) is within 10% of 20/s, not three times
    it; each message is handled once."""
    tasks, done = f"{key_prefix}tasks", f"{key_prefix}done"
    for n in range(300):
        await redis_client.xadd(tasks, {"n": str(n)})
    _three(tmp_path, RATE_FLOW, redis_url, key_prefix, "", processes)
    await wait_for(lambda: _length(redis_client, done, 240), timeout=60, what="12s of flow")
    rows = await redis_client.xrange(done)
    start = _ms(rows[0][0]) + 1000  # past the burst and the runners' start
    in_window = [i for i, _ in rows if start <= _ms(i) < start + 10_000]
    assert 180 <= len(in_window) <= 220, len(in_window)
    counts = Counter(f["n"] for _, f in rows)
    assert max(counts.values()) == 1


SLOTS_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
    groups:
      work:
        stream: tasks
        max_in_flight: 2
        concurrency: 4
        routes:
          - call: {M}:handle
"""


def _recorder(path: Path) -> str:
    return f"""
        import asyncio, time

        async def handle(msg):
            start = time.time()
            await asyncio.sleep(0.05)
            with open({str(path)!r}, "a") as out:
                out.write(f"{{msg['n']}} {{start}} {{time.time()}}\\n")
    """


async def test_max_in_flight_bounds_handlers_across_runners(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str, processes: list[Any]
) -> None:
    """max_in_flight: 2 over three runners of concurrency 4: never more than two handlers
    run at once (from their start and end times), and all 60 messages run once."""
    record = tmp_path / "record.txt"
    mod = write_module(tmp_path, _recorder(record))
    for n in range(60):
        await redis_client.xadd(f"{key_prefix}tasks", {"n": str(n)})
    _three(tmp_path, SLOTS_FLOW, redis_url, key_prefix, mod, processes)

    def finished() -> bool:
        return record.exists() and len(record.read_text().splitlines()) >= 60

    await wait_for(finished, timeout=60, what="all handled")
    rows = [line.split() for line in record.read_text().splitlines()]
    assert Counter(n for n, _, _ in rows) == Counter({str(n): 1 for n in range(60)})
    events = sorted([(float(s), 1) for _, s, _ in rows] + [(float(e), -1) for _, _, e in rows])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2


DEDUP_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      done: {key: "{P}done"}
    groups:
      work:
        stream: tasks
        dedup: {key: "{{ msg.k }}", window: 10m}
        routes:
          - to: done
"""


async def test_copies_are_handled_once_per_dedup_key_across_runners(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str, processes: list[Any]
) -> None:
    """Three copies each of 40 keys, interleaved, read by three runners: each key reaches
    done exactly once, every copy is acknowledged, and the rest are counted duplicates."""
    tasks, done = f"{key_prefix}tasks", f"{key_prefix}done"
    _three(tmp_path, DEDUP_FLOW, redis_url, key_prefix, "", processes)
    for copy in range(3):
        for k in range(40):
            await redis_client.xadd(tasks, {"k": str(k), "copy": str(copy)})

    async def all_acked() -> bool:
        try:
            # every entry read (last-delivered-id at the newest: Redis 6.2 keeps no
            # entries-read) and none pending
            newest = (await redis_client.xrevrange(tasks, count=1))[0][0]
            group = (await redis_client.xinfo_groups(tasks))[0]
            return (
                int((await redis_client.xpending(tasks, "work"))["pending"]) == 0
                and group["last-delivered-id"] == newest
            )
        except Exception:
            return False

    await wait_for(all_acked, timeout=30, what="every copy acknowledged")
    counts = Counter(f["k"] for _, f in await redis_client.xrange(done))
    assert counts == Counter({str(k): 1 for k in range(40)})
