"""Benchmark 1, consume: drain a pre-loaded backlog over four priority streams.

cortex-flow: a Runner with one group on the four priority keys, strict priority, batch 100,
one ``call`` route to a trivial handler declared ``inline: true``.

Baselines, hand-written with redis-py asyncio (hiredis, decode_responses=True), COUNT 100,
one XACK per batch, the same handler:

- A: one stream holding every message (the cheapest possible loop);
- B: the four priority streams, strict fallback: XREADGROUP critical, then high, normal,
  low, one round trip each, and take the first non-empty.
- C: one stream, each batch's XACK sent in the same pipeline as the next read (one round
  trip per batch): the best hand loop.

Every run ends when XINFO GROUPS shows every entry read and none pending.
Targets: cortex-flow over four streams >= 70% of baseline B; cortex-flow over one
stream (the same inline route) >= 90% of baseline C.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import handlers
from bench.common import (
    GROUP,
    Figure,
    Server,
    Timing,
    create_groups,
    pipelined_loop,
    preload,
    priority_flow,
    priority_keys,
    project,
    run_baseline,
    run_cortex,
    strict_loop,
    wait_acked,
)

SHARES = {"critical": 0.01, "high": 0.04, "normal": 0.15, "low": 0.80}
TARGET = 0.70


def split(total: int, keys: list[str]) -> dict[str, int]:
    counts = {key: int(total * share) for key, share in zip(keys, SHARES.values(), strict=True)}
    counts[keys[-1]] += total - sum(counts.values())
    return counts


async def _baseline(
    server: Server, keys: list[str], last: dict[str, str], pipelined: bool = False
) -> Timing:
    client = server.aclient()
    try:
        if pipelined:
            loop = pipelined_loop(client, keys[0], handlers.noop)
        else:
            loop = strict_loop(client, keys, handlers.noop)
        return await run_baseline(loop, lambda: wait_acked(client, last))
    finally:
        await client.aclose()


def single_flow(key: str, handler: str) -> str:
    """One stream, one group, batch 100, one inline ``call`` route."""
    return f"""\
version: 1
streams:
  tasks:
    key: "{key}"
groups:
  {GROUP}:
    stream: tasks
    start: earliest
    batch: 100
    routes:
      - call: {{function: "{handler}", inline: true}}
"""


async def _cortex(server: Server, flow: str, last: dict[str, str], profile: Any) -> Timing:
    client = server.aclient()
    try:
        with project(server, flow) as proj:
            return await run_cortex(proj, lambda: wait_acked(client, last), profile)
    finally:
        await client.aclose()


def run(server: Server, messages: int, repeat: int, profile: Any = None) -> list[Figure]:
    """Best msg/s of ``repeat`` runs each of A, B and cortex-flow (interleaved)."""
    prefix = "bench:tasks"
    best: dict[str, float] = {}  # msg/s
    cpu: dict[str, float] = {}  # this process's CPU, us per message
    redis_cpu: dict[str, float] = {}  # the server's CPU, us per message
    startup = 0.0

    def record(name: str, result: Timing, server_cpu: float) -> None:
        best[name] = max(best.get(name, 0.0), messages / result.seconds)
        cpu[name] = min(cpu.get(name, float("inf")), result.cpu / messages * 1e6)
        redis_cpu[name] = min(redis_cpu.get(name, float("inf")), server_cpu / messages * 1e6)

    for _ in range(repeat):
        for name in ("A", "B", "C", "cortex", "cortex1"):
            server.flush()
            with server.client() as client:
                if name in ("A", "C", "cortex1"):
                    keys = ["bench:single"]
                    counts = {keys[0]: messages}
                else:
                    keys = priority_keys(prefix)
                    counts = split(messages, keys)
                create_groups(client, keys)
                last = preload(client, counts)
            server_cpu = server.cpu_seconds()
            if name == "cortex":
                flow = priority_flow(prefix, "bench.handlers:noop")
                result = asyncio.run(_cortex(server, flow, last, profile))
                startup = result.startup
            elif name == "cortex1":
                flow = single_flow(keys[0], "bench.handlers:noop")
                result = asyncio.run(_cortex(server, flow, last, None))
            else:
                result = asyncio.run(_baseline(server, keys, last, pipelined=name == "C"))
            record(name, result, server.cpu_seconds() - server_cpu)
    cortex, a, b, c, one = best["cortex"], best["A"], best["B"], best["C"], best["cortex1"]
    ratio = cortex / b
    return [
        Figure(
            "consume",
            "msg/s, one stream, inline",
            one,
            "C: hand loop, ack pipelined",
            c,
            ">= 90% of C",
            one / c >= 0.9,
            note=(
                f"one stream: client CPU per msg: cortex-flow {cpu['cortex1']:.1f} us, C "
                f"{cpu['C']:.1f} us; Redis CPU per msg: cortex-flow {redis_cpu['cortex1']:.1f} "
                f"us, C {redis_cpu['C']:.1f} us"
            ),
        ),
        Figure(
            "consume",
            "msg/s, 4 priority streams",
            cortex,
            "B: hand loop, strict fallback",
            b,
            f">= {TARGET:.0%} of B",
            ratio >= TARGET,
            note=(
                f"{messages:,} msgs, best of {repeat}; client CPU per msg: cortex-flow "
                f"{cpu['cortex']:.1f} us, B {cpu['B']:.1f} us, A {cpu['A']:.1f} us; Redis CPU "
                f"per msg: cortex-flow {redis_cpu['cortex']:.1f} us, B {redis_cpu['B']:.1f} us, "
                f"A {redis_cpu['A']:.1f} us; "
                f"runner startup (not timed) {startup * 1000:.0f} ms"
            ),
        ),
        Figure(
            "consume",
            "msg/s, 4 priority streams",
            cortex,
            "A: hand loop, one stream",
            a,
            "(reference)",
            None,
        ),
    ]
