"""Benchmark: send-to-handler latency at a steady 1,000 msg/s, on every call path.

A publisher process adds one task entry per millisecond (in ticks of 10 every 10 ms) to
one stream, each holding its publish time (``sent``). The handler records now - sent.
cortex-flow runs each path on the defaults: ``inline: true``, an ``async def``, and a
plain ``def`` in the call thread pool. Baseline: a hand loop (XREADGROUP BLOCK, COUNT 100,
the handler per entry, one XACK per batch). Target: each path's p99 within 1.5x of the
hand loop's (and a 2 ms floor, below which loopback jitter decides).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis

from bench import handlers
from bench.common import (
    CONSUMER,
    GROUP,
    Figure,
    Server,
    create_groups,
    project,
    run_cortex,
    side_process,
)
from bench.latency import _until_samples, percentile

KEY = "bench:steady"
RATE = 1000
TICK = 0.01
FLOOR_MS = 2.0


def publisher(port: int, ready: Any, go: Any, stop: Any) -> None:
    """Runs in its own process: RATE entries a second, stamped, until stopped."""
    client = redis.Redis(port=port, decode_responses=True)
    ready.set()
    go.wait()
    per_tick = int(RATE * TICK)
    tick = time.perf_counter()
    while not stop.is_set():
        pipe = client.pipeline(transaction=False)
        for _ in range(per_tick):
            pipe.xadd(KEY, {"kind": "task", "sent": repr(time.time())})
        pipe.execute()
        tick += TICK
        time.sleep(max(0.0, tick - time.perf_counter()))
    client.close()


def _flow(path: str) -> str:
    handler = "arecord_latency" if path == "async" else "record_latency"
    inline = "true" if path == "inline" else "false"
    return f"""\
version: 1
streams:
  tasks: {{key: "{KEY}"}}
groups:
  {GROUP}:
    stream: tasks
    start: latest
    routes:
      - call: {{function: "bench.handlers:{handler}", inline: {inline}}}
"""


async def _hand(server: Server, samples: int, go: Any) -> None:
    client = server.aclient()
    try:
        go.set()
        while len(handlers.SAMPLES) < samples:
            resp = await client.xreadgroup(GROUP, CONSUMER, {KEY: ">"}, count=100, block=100)
            if not resp:
                continue
            ids = []
            for entry_id, fields in resp[0][1]:
                handlers.record_latency(fields)
                ids.append(entry_id)
            await client.xack(KEY, GROUP, *ids)
    finally:
        await client.aclose()


async def _cortex(server: Server, samples: int, go: Any, path: str) -> None:
    async def until() -> float:
        go.set()
        return await _until_samples(samples)

    with project(server, _flow(path)) as proj:
        await run_cortex(proj, until)


def measure(server: Server, path: str, samples: int) -> list[float]:
    import multiprocessing as mp

    server.flush()
    with server.client() as client:
        create_groups(client, [KEY])
        client.xgroup_setid(KEY, GROUP, "$")
    ctx = mp.get_context("spawn")
    ready, go, stop = ctx.Event(), ctx.Event(), ctx.Event()
    with side_process(publisher, server.port, ready, go, stop, wake=(stop, go)):
        if not ready.wait(120):
            raise RuntimeError("steady publisher did not start")
        handlers.reset()
        if path == "hand":
            asyncio.run(_hand(server, samples, go))
        else:
            asyncio.run(_cortex(server, samples, go, path))
        return [s * 1000 for s in handlers.SAMPLES[samples // 10 :]]  # past the warm-up


def run(server: Server, samples: int, repeat: int = 1) -> list[Figure]:
    """Each path ``repeat`` times, interleaved with the hand loop; p99 of the pooled samples
    (one run's p99 moves by a millisecond or two on a shared machine)."""
    paths = ("hand", "inline", "async", "sync")
    pooled: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(repeat):
        for path in paths:
            pooled[path] += measure(server, path, samples)
    hand = percentile(pooled["hand"], 0.99)
    figures = []
    for path in paths[1:]:
        p99 = percentile(pooled[path], 0.99)
        bound = max(1.5 * hand, FLOOR_MS)
        figures.append(
            Figure(
                "steady",
                f"p99 ms at {RATE:,} msg/s, {path}",
                p99,
                "hand loop p99",
                hand,
                "<= 1.5x hand (2 ms floor)",
                p99 <= bound,
            )
        )
    figures[-1].note = (
        f"{samples:,} messages per run at {RATE:,} msg/s, first 10% not counted; "
        f"p99 of {repeat} run(s) pooled"
    )
    return figures
