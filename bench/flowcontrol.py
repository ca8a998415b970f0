"""Benchmark: flow control's cost, and a shared rate's accuracy.

**Overhead.** The route benchmark's group (``when`` + ``to``, each publish atomic with
its XACK, batch 100) with a ``rate_limit`` it never reaches (10,000,000/s, burst
1,000,000), against the same group without one. Runs interleave; best of ``repeat``.
Target: the rate-limited group keeps >= 95% of the other's throughput (one bucket
script call per batch of 100 entries).

**Accuracy.** Three ``cortex-flow run`` processes on one group with ``rate_limit:
{rate: 50/s, burst: 5}`` over a backlog; the handled rate over 30 s of steady flow
(quick: 10 s),
from the server's entry IDs of what the route published, against the limit.
Target: within 10% of it.

**Delayed messages.** 400 messages delayed 0.1 to 2 s with one runner up: how long after
its due time each reaches its stream (entry ID against due time, both the server's
clock). Target: none early, p99 within a second.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    CONFIG,
    GROUP,
    Figure,
    Server,
    Timing,
    create_groups,
    preload,
    project,
    run_cortex,
    wait_acked,
)
from cortex_flow.flow.topology import namespace
from cortex_flow.runtime.runner import Runner
from cortex_flow.wire.delayed import schedule

SOURCE = "bench:fc:in"
TARGET_KEY = "bench:fc:out"
OVERHEAD_TARGET = 0.95
RATE = 50.0

FLOW = f"""\
version: 1
streams:
  inbox:
    key: {SOURCE}
  out:
    key: {TARGET_KEY}
groups:
  {GROUP}:
    stream: inbox
    start: earliest
    batch: 100
{{limit}}    routes:
      - when: "msg.kind == 'task'"
        to: out
"""
NEVER_HIT = "    rate_limit: {rate: 10000000/s, burst: 1000000}\n"


async def _cortex(server: Server, flow: str, last: dict[str, str]) -> Timing:
    client = server.aclient()
    try:
        with project(server, flow) as proj:
            return await run_cortex(proj, lambda: wait_acked(client, last))
    finally:
        await client.aclose()


def overhead(server: Server, messages: int, repeat: int) -> Figure:
    best: dict[str, float] = {}
    for _ in range(repeat):
        for name, limit in (("plain", ""), ("limited", NEVER_HIT)):
            server.flush()
            with server.client() as client:
                create_groups(client, [SOURCE])
                last = preload(client, {SOURCE: messages})
            result = asyncio.run(_cortex(server, FLOW.format(limit=limit), last))
            with server.client() as client:
                published = client.xlen(TARGET_KEY)
            if published != messages:
                raise RuntimeError(f"flowcontrol ({name}): {published} published of {messages}")
            best[name] = max(best.get(name, 0.0), messages / result.seconds)
    ratio = best["limited"] / best["plain"]
    return Figure(
        "flowcontrol",
        "msg/s, rate_limit never hit",
        best["limited"],
        "the same group, no rate_limit",
        best["plain"],
        f">= {OVERHEAD_TARGET:.0%} of it",
        ratio >= OVERHEAD_TARGET,
        note=f"{messages:,} msgs, best of {repeat}; overhead {max(0.0, 1 - ratio):.1%}",
    )


def accuracy(server: Server, seconds: float = 10.0) -> Figure:
    """Three runner processes share ``RATE``; the rate they handle over ``seconds``."""
    server.flush()
    total = int(RATE * (seconds + 4))
    with server.client() as client:
        create_groups(client, [SOURCE])
        preload(client, {SOURCE: total})
    limit = f"    rate_limit: {{rate: {RATE:g}/s, burst: 5}}\n"
    with tempfile.TemporaryDirectory(prefix="cortex-bench-") as tmp:
        root = Path(tmp)
        (root / "flows").mkdir()
        (root / "flows" / "bench.yaml").write_text(FLOW.format(limit=limit))
        processes = []
        for n in range(3):
            config = root / f"r{n}.yaml"
            config.write_text(CONFIG.format(url=server.url).replace("name: bench", f"name: r{n}"))
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "cortex_flow", "run", "--config", str(config)],
                    cwd=root,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        try:
            with server.client() as client:
                deadline = time.monotonic() + seconds + 60
                while client.xlen(TARGET_KEY) < total - 5 and time.monotonic() < deadline:
                    time.sleep(0.2)
                ids = [entry_id for entry_id, _ in client.xrange(TARGET_KEY)]
        finally:
            for process in processes:
                if process.poll() is None:
                    os.kill(process.pid, signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
    stamps = [int(str(i).split("-")[0]) for i in ids]
    start = stamps[0] + 1000  # past the burst and the runners' start
    handled = sum(1 for ms in stamps if start <= ms < start + seconds * 1000)
    rate = handled / seconds
    return Figure(
        "flowcontrol",
        "msg/s, 3 runners sharing 50/s",
        rate,
        "the limit",
        RATE,
        "within 10% of it",
        abs(rate / RATE - 1) <= 0.10,
        note=f"{handled} handled in {seconds:g}s of steady flow by three runner processes",
    )


async def _lateness(server: Server, count: int) -> list[int]:
    """ms from each delayed message's due time to its entry in the stream (server clock)."""
    client: Any = server.aclient()
    try:
        with project(server, FLOW.format(limit="")) as proj:
            ns = namespace(proj.topology)
            runner = Runner(proj, admin=False)
            await runner.start()
            try:
                due = {}
                for n in range(count):
                    held = await schedule(
                        client, ns, SOURCE, {"kind": "task", "n": str(n)}, 0.1 + (n % 20) / 10
                    )
                    due[str(n)] = held.due_ms
                deadline = time.monotonic() + 30
                while await client.xlen(SOURCE) < count and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                rows = await client.xrange(SOURCE)
            finally:
                await runner.stop(grace=5)
    finally:
        await client.aclose()
    if len(rows) != count:
        raise RuntimeError(f"flowcontrol (delayed): {len(rows)} moved of {count}")
    return sorted(int(i.split("-")[0]) - due[f["n"]] for i, f in rows)


def lateness(server: Server, count: int = 400) -> Figure:
    """How late delayed messages reach their stream: p99 over ``count``, one runner."""
    server.flush()
    late = asyncio.run(_lateness(server, count))
    if late[0] < 0:
        raise RuntimeError(f"flowcontrol (delayed): a message moved {-late[0]} ms early")
    p99 = late[min(len(late) - 1, int(len(late) * 0.99))]
    return Figure(
        "flowcontrol",
        "delayed: p99 ms after due",
        float(p99),
        "-",
        None,
        "<= 1000 ms, none early",
        p99 <= 1000,
        note=f"{count} messages delayed 0.1-2 s; earliest {late[0]} ms after due, p50 "
        f"{late[len(late) // 2]} ms, max {late[-1]} ms",
    )


def run(server: Server, messages: int, repeat: int, seconds: float = 30.0) -> list[Figure]:
    return [overhead(server, messages, repeat), accuracy(server, seconds), lateness(server)]


__all__ = ["run"]
