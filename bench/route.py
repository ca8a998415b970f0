"""Benchmark 2, route: ``when`` + ``to``, each publish atomic with the source entry's XACK.

cortex-flow: one group on one stream, batch 100, one route
``when: "msg.kind == 'task'"`` / ``to: out`` (the message is republished as is).

Baselines, hand-written: XREADGROUP COUNT 100, the same test in Python, then one
MULTI/EXEC per batch holding the XADDs and the XACK; and the same with each batch's
MULTI/EXEC sent in the same pipeline as the next read (one round trip per batch: the
best hand loop).

Every run ends when XINFO GROUPS shows every entry read and none pending.
Targets: cortex-flow >= 50% of the first baseline, >= 90% of the pipelined one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.common import (
    CONSUMER,
    GROUP,
    Figure,
    Server,
    Timing,
    create_groups,
    preload,
    project,
    run_baseline,
    run_cortex,
    wait_acked,
)

SOURCE = "bench:route:in"
TARGET_KEY = "bench:route:out"
TARGET = 0.50

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
    routes:
      - when: "msg.kind == 'task'"
        to: out
"""


async def route_loop(client: Any, count: int = 100) -> None:
    """Baseline: read a batch, publish the matching entries and ack all in one MULTI/EXEC."""
    while True:
        resp = await client.xreadgroup(GROUP, CONSUMER, {SOURCE: ">"}, count=count)
        if not resp or not resp[0][1]:
            return
        pipe = client.pipeline(transaction=True)
        ids = []
        for entry_id, fields in resp[0][1]:
            if fields.get("kind") == "task":
                pipe.xadd(TARGET_KEY, fields)
            ids.append(entry_id)
        pipe.xack(SOURCE, GROUP, *ids)
        await pipe.execute()


async def pipelined_route_loop(client: Any, count: int = 100) -> None:
    """Baseline: as ``route_loop``, each batch's MULTI/EXEC in one pipeline with the next read."""
    commit: list[Any] = []  # the commands of the last batch's MULTI/EXEC
    while True:
        pipe = client.pipeline(transaction=False)
        if commit:
            pipe.execute_command("MULTI")
            for command in commit:
                pipe.execute_command(*command)
            pipe.execute_command("EXEC")
        pipe.xreadgroup(GROUP, CONSUMER, {SOURCE: ">"}, count=count)
        resp = (await pipe.execute())[-1]
        if not resp or not resp[0][1]:
            return
        commit, ids = [], []
        for entry_id, fields in resp[0][1]:
            if fields.get("kind") == "task":
                flat = [item for pair in fields.items() for item in pair]
                commit.append(("XADD", TARGET_KEY, "*", *flat))
            ids.append(entry_id)
        commit.append(("XACK", SOURCE, GROUP, *ids))


async def _baseline(server: Server, last: dict[str, str], pipelined: bool = False) -> Timing:
    client = server.aclient()
    try:
        loop = pipelined_route_loop(client) if pipelined else route_loop(client)
        return await run_baseline(loop, lambda: wait_acked(client, last))
    finally:
        await client.aclose()


async def _cortex(server: Server, last: dict[str, str], profile: Any) -> Timing:
    client = server.aclient()
    try:
        with project(server, FLOW) as proj:
            return await run_cortex(proj, lambda: wait_acked(client, last), profile)
    finally:
        await client.aclose()


def run(server: Server, messages: int, repeat: int, profile: Any = None) -> list[Figure]:
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    redis_cpu: dict[str, float] = {}
    for _ in range(repeat):
        for name in ("baseline", "pipelined", "cortex"):
            server.flush()
            with server.client() as client:
                create_groups(client, [SOURCE])
                last = preload(client, {SOURCE: messages})
            server_cpu = server.cpu_seconds()
            if name == "cortex":
                result = asyncio.run(_cortex(server, last, profile))
            else:
                result = asyncio.run(_baseline(server, last, pipelined=name == "pipelined"))
            server_cpu = (server.cpu_seconds() - server_cpu) / messages * 1e6
            redis_cpu[name] = min(redis_cpu.get(name, float("inf")), server_cpu)
            with server.client() as client:
                published = client.xlen(TARGET_KEY)
            if published != messages:
                raise RuntimeError(f"route ({name}): {published} published, expected {messages}")
            best[name] = max(best.get(name, 0.0), messages / result.seconds)
            cpu[name] = min(cpu.get(name, float("inf")), result.cpu / messages * 1e6)
    ratio = best["cortex"] / best["baseline"]
    return [
        Figure(
            "route",
            "msg/s, when + to (atomic)",
            best["cortex"],
            "hand loop, MULTI/EXEC per batch",
            best["baseline"],
            f">= {TARGET:.0%} of baseline",
            ratio >= TARGET,
            note=(
                f"{messages:,} msgs, best of {repeat}; client CPU per msg: cortex-flow "
                f"{cpu['cortex']:.1f} us, baseline {cpu['baseline']:.1f} us; Redis CPU per msg: "
                f"cortex-flow {redis_cpu['cortex']:.1f} us, baseline {redis_cpu['baseline']:.1f} us"
            ),
        ),
        Figure(
            "route",
            "msg/s, when + to (atomic)",
            best["cortex"],
            "hand loop, MULTI/EXEC pipelined",
            best["pipelined"],
            ">= 90% of it",
            best["cortex"] / best["pipelined"] >= 0.9,
            note=(
                f"pipelined: client CPU per msg {cpu['pipelined']:.1f} us; Redis CPU per msg "
                f"{redis_cpu['pipelined']:.1f} us"
            ),
        ),
    ]
