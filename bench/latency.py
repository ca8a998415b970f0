"""Benchmark 3, latency: how long a critical entry waits while a low-priority backlog drains.

A publisher process loads ``backlog`` entries into the low stream, then every ~10 ms
publishes one critical entry holding its publish time (``sent``, epoch seconds). The
handler (in the consumer's process) records now - sent. Whenever the low backlog falls
under half of ``backlog`` the publisher tops it up by 1,000 entries per tick, so every
sample is taken with a low backlog waiting. The run ends after ``samples`` samples.

cortex-flow: a Runner, strict priority over the four keys, batch 100, ``inline: true``
handler. Baseline: the hand-written strict-fallback loop (consume's baseline B).
Target: cortex-flow's p99 <= 20 ms.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import redis

from bench import handlers
from bench.common import (
    Backlog,
    Figure,
    Server,
    create_groups,
    priority_flow,
    priority_keys,
    project,
    run_cortex,
    side_process,
    strict_loop,
)

PREFIX = "bench:lat"
TARGET_MS = 20.0
INTERVAL = 0.01
REFILL = 1000


def publisher(port: int, backlog: int, ready: Any, go: Any, stop: Any) -> None:
    """Runs in its own process: load the backlog, then a critical entry every INTERVAL."""
    client = redis.Redis(port=port, decode_responses=True)
    critical, low = priority_keys(PREFIX)[0], priority_keys(PREFIX)[-1]
    waiting = Backlog(client, low)
    waiting.fill(backlog)
    ready.set()
    go.wait()
    tick = time.perf_counter()
    while not stop.is_set():
        client.xadd(critical, {"kind": "task", "sent": repr(time.time())})
        if waiting.waiting() < backlog // 2:
            waiting.fill(REFILL)
        tick += INTERVAL
        time.sleep(max(0.0, tick - time.perf_counter()))
    client.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _until_samples(samples: int, timeout: float = 120.0) -> float:
    deadline = time.perf_counter() + timeout
    while len(handlers.SAMPLES) < samples:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"only {len(handlers.SAMPLES)} latency samples in {timeout:.0f}s")
        await asyncio.sleep(0.02)
    return time.perf_counter()


async def _baseline(server: Server, samples: int, go: Any) -> None:
    client = server.aclient()
    stop = asyncio.Event()
    try:
        task = asyncio.create_task(
            strict_loop(client, priority_keys(PREFIX), handlers.record_latency, stop=stop)
        )
        go.set()
        await _until_samples(samples)
        stop.set()
        await task
    finally:
        await client.aclose()


async def _cortex(server: Server, samples: int, go: Any, profile: Any, path: str) -> None:
    async def until() -> float:
        go.set()
        return await _until_samples(samples)

    if path == "async":  # an async def at the default concurrency
        flow = priority_flow(PREFIX, "bench.handlers:arecord_latency", inline=False)
    else:
        flow = priority_flow(PREFIX, "bench.handlers:record_latency")
    with project(server, flow) as proj:
        await run_cortex(proj, until, profile)


def measure(server: Server, name: str, backlog: int, samples: int, profile: Any) -> list[float]:
    server.flush()
    with server.client() as client:
        create_groups(client, priority_keys(PREFIX))
    ctx = mp.get_context("spawn")
    ready, go, stop = ctx.Event(), ctx.Event(), ctx.Event()
    with side_process(publisher, server.port, backlog, ready, go, stop, wake=(stop, go)):
        if not ready.wait(120):
            raise RuntimeError("latency publisher did not start")
        handlers.reset()
        if name in ("cortex", "async"):
            asyncio.run(_cortex(server, samples, go, profile, name))
        else:
            asyncio.run(_baseline(server, samples, go))
        return [s * 1000 for s in handlers.SAMPLES]


def run(server: Server, backlog: int, samples: int, profile: Any = None) -> list[Figure]:
    base = measure(server, "baseline", backlog, samples, None)
    mine = measure(server, "cortex", backlog, samples, profile)
    on_async = measure(server, "async", backlog, samples, None)
    p99 = percentile(mine, 0.99)
    async_p99 = percentile(on_async, 0.99)
    note = f"{len(mine)} samples, {backlog:,} low backlog"
    return [
        Figure(
            "latency",
            "critical p99, ms, async call",
            async_p99,
            "hand loop, strict fallback",
            percentile(base, 0.99),
            f"<= {TARGET_MS:g} ms",
            async_p99 <= TARGET_MS,
            note=f"async call, default concurrency: max {max(on_async):.1f} ms",
        ),
        Figure(
            "latency",
            "critical p50, ms",
            percentile(mine, 0.50),
            "hand loop, strict fallback",
            percentile(base, 0.50),
            "(reference)",
            None,
        ),
        Figure(
            "latency",
            "critical p99, ms",
            p99,
            "hand loop, strict fallback",
            percentile(base, 0.99),
            f"<= {TARGET_MS:g} ms",
            p99 <= TARGET_MS,
            note=f"{note}; max {max(mine):.1f} ms",
        ),
    ]
