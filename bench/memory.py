"""Benchmark 4, memory: the runner's RSS after ``first`` and after ``last`` messages handled.

The runner runs in this process (strict priority over four keys, batch 100, an
``inline: true`` handler that counts). A producer process keeps a bounded backlog in the
low stream (topping it up in chunks of 1,000 when under half of ``window``) and trims
what the group has read and acknowledged (XTRIM MINID at the oldest pending entry, or
just past the last delivered one), so Redis memory stays bounded too.

The baseline is the RSS after ``first`` messages; the figure is the RSS after ``last``.
Target: growth <= 10%.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import time
from typing import Any

import redis

from bench import handlers
from bench.common import (
    GROUP,
    Backlog,
    Figure,
    Server,
    create_groups,
    id_tuple,
    priority_flow,
    priority_keys,
    project,
    rss_bytes,
    run_cortex,
    side_process,
)

PREFIX = "bench:mem"
TARGET = 0.10
CHUNK = 1000


def _trim(client: redis.Redis, key: str) -> None:
    """XTRIM MINID below everything the group has not yet acknowledged."""
    summary = client.xpending(key, GROUP)
    if summary["pending"]:
        minid = str(summary["min"])
    else:
        info = next(g for g in client.xinfo_groups(key) if g["name"] == GROUP)
        ms, seq = id_tuple(info["last-delivered-id"])
        minid = f"{ms}-{seq + 1}"
    client.xtrim(key, minid=minid, approximate=False)


def producer(port: int, window: int, stop: Any) -> None:
    """Runs in its own process: keep ``window // 2 .. window`` entries waiting; trim."""
    client = redis.Redis(port=port, decode_responses=True)
    low = priority_keys(PREFIX)[-1]
    waiting = Backlog(client, low)
    waiting.fill(window)
    next_trim = 0.0
    while not stop.is_set():
        if waiting.waiting() < window // 2:
            waiting.fill(CHUNK)
        else:
            time.sleep(0.002)
        now = time.monotonic()
        if now >= next_trim:
            _trim(client, low)
            next_trim = now + 0.1
    client.close()


def run(server: Server, first: int, last: int, window: int = 20_000) -> list[Figure]:
    server.flush()
    with server.client() as client:
        create_groups(client, priority_keys(PREFIX))
    stop = mp.get_context("spawn").Event()
    handlers.reset()
    rss: dict[int, int] = {}
    redis_mem: dict[int, int] = {}

    async def until() -> float:
        started = time.perf_counter()
        client = server.aclient()
        try:
            for mark in (first, last):
                while handlers.COUNTER[0] < mark:
                    if time.perf_counter() - started > 600:
                        raise TimeoutError(f"only {handlers.COUNTER[0]} messages in 600s")
                    await asyncio.sleep(0.01)
                gc.collect()
                rss[mark] = rss_bytes()
                redis_mem[mark] = int((await client.info("memory"))["used_memory"])
        finally:
            await client.aclose()
        return time.perf_counter()

    with (
        side_process(producer, server.port, window, stop, wake=(stop,)),
        project(server, priority_flow(PREFIX, "bench.handlers:count")) as proj,
    ):
        timing = asyncio.run(run_cortex(proj, until))
    growth = rss[last] / rss[first] - 1
    return [
        Figure(
            "memory",
            f"runner RSS after {last:,} msgs, MiB",
            rss[last] / 2**20,
            f"RSS after {first:,} msgs",
            rss[first] / 2**20,
            f"growth <= {TARGET:.0%}",
            growth <= TARGET,
            note=(
                f"growth {growth:+.1%}; {handlers.COUNTER[0] / timing.seconds:,.0f} msg/s "
                f"with producer; redis {redis_mem[first] / 2**20:.1f} -> "
                f"{redis_mem[last] / 2**20:.1f} MiB"
            ),
        )
    ]
