"""Benchmark: the ``call`` paths real handlers take, on the defaults a user gets.

- async: 4 strict priority streams, ``call: bench.handlers:anoop`` (an ``async def``),
  default ``concurrency`` and ``batch``. Baseline: the strict fallback hand loop that
  awaits the same coroutine per message (XREADGROUP COUNT 100, one XACK per batch).
  Target: >= 0.8 of it.
- sync: the same with ``call: bench.handlers:noop`` (a plain ``def``, run in the call
  thread pool). Baseline: the hand loop that runs each batch in one thread-pool call.
  Target: >= 0.5 of it.
- io: one stream, ``call: bench.handlers:io_wait`` (awaits 50 ms) with
  ``concurrency: 200``. The ideal is 200 / 0.05 s = 4,000 msg/s. Target: >= 0.9 of it.
- io sync: the same with ``bench.handlers:io_block`` (a plain ``def`` that sleeps 50 ms,
  as a sync HTTP client would): every call needs a thread of its own. Same target.

Every run ends when XINFO GROUPS shows every entry read and none pending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from bench import handlers
from bench.common import (
    CONSUMER,
    GROUP,
    Figure,
    Server,
    Timing,
    create_groups,
    preload,
    priority_keys,
    project,
    run_baseline,
    run_cortex,
    wait_acked,
)
from bench.consume import split

PREFIX = "bench:calls"


def _flow(handler: str, *, keys: str, extra: str = "") -> str:
    return f"""\
version: 1
streams:
  tasks:
    key: "{keys}"
{"    priorities: [critical, high, normal, low]" if "priority" in keys else ""}
groups:
  {GROUP}:
    stream: tasks
    start: earliest
{extra}    routes:
      - call: "{handler}"
"""


async def _strict_batches(
    client: Any,
    keys: Sequence[str],
    run_batch: Callable[[list[Mapping[str, Any]]], Awaitable[None]],
) -> None:
    """The strict fallback loop: first non-empty key (COUNT 100), the batch, one XACK."""
    while True:
        for key in keys:
            resp = await client.xreadgroup(GROUP, CONSUMER, {key: ">"}, count=100)
            if resp and resp[0][1]:
                break
        else:
            return
        await run_batch([fields for _, fields in resp[0][1]])
        await client.xack(key, GROUP, *(entry_id for entry_id, _ in resp[0][1]))


async def _await_each(batch: list[Mapping[str, Any]]) -> None:
    for fields in batch:
        await handlers.anoop(fields)


async def _pool_batch(batch: list[Mapping[str, Any]]) -> None:
    def run() -> None:
        for fields in batch:
            handlers.noop(fields)

    await asyncio.get_running_loop().run_in_executor(None, run)


def _load(server: Server, keys: list[str], messages: int) -> dict[str, str]:
    server.flush()
    with server.client() as client:
        create_groups(client, keys)
        counts = split(messages, keys) if len(keys) > 1 else {keys[0]: messages}
        return preload(client, counts)


async def _cortex(server: Server, flow: str, last: dict[str, str]) -> Timing:
    client = server.aclient()
    try:
        with project(server, flow) as proj:
            return await run_cortex(proj, lambda: wait_acked(client, last))
    finally:
        await client.aclose()


async def _hand(
    server: Server,
    keys: list[str],
    last: dict[str, str],
    run_batch: Callable[[list[Mapping[str, Any]]], Awaitable[None]],
) -> Timing:
    client = server.aclient()
    try:
        return await run_baseline(
            _strict_batches(client, keys, run_batch), lambda: wait_acked(client, last)
        )
    finally:
        await client.aclose()


def _measure(
    server: Server,
    messages: int,
    repeat: int,
    flow: str,
    keys: list[str],
    run_batch: Callable[[list[Mapping[str, Any]]], Awaitable[None]] | None,
) -> tuple[float, float, float, float, float, float]:
    """Best msg/s and least CPU per message (us, client and Redis), cortex-flow then hand."""
    best = {"cortex": 0.0, "hand": 0.0}
    cpu = {"cortex": float("inf"), "hand": float("inf")}
    rcpu = {"cortex": float("inf"), "hand": float("inf")}
    for _ in range(repeat):
        for name in ("hand", "cortex"):
            if name == "hand" and run_batch is None:
                continue
            last = _load(server, keys, messages)
            before = server.cpu_seconds()
            if name == "cortex":
                result = asyncio.run(_cortex(server, flow, last))
            else:
                assert run_batch is not None
                result = asyncio.run(_hand(server, keys, last, run_batch))
            used = server.cpu_seconds() - before
            best[name] = max(best[name], messages / result.seconds)
            cpu[name] = min(cpu[name], result.cpu / messages * 1e6)
            rcpu[name] = min(rcpu[name], used / messages * 1e6)
    return best["cortex"], best["hand"], cpu["cortex"], cpu["hand"], rcpu["cortex"], rcpu["hand"]


def run(server: Server, messages: int, io_messages: int, repeat: int) -> list[Figure]:
    keys = priority_keys(PREFIX)
    family = f"{PREFIX}:{{{{ priority }}}}"
    figures = []
    for label, handler, run_batch, target, baseline in (
        ("async", "bench.handlers:anoop", _await_each, 0.8, "hand loop awaiting each"),
        ("sync", "bench.handlers:noop", _pool_batch, 0.5, "hand loop, a batch per thread"),
    ):
        flow = _flow(handler, keys=family)
        mine, hand, cpu, hand_cpu, rcpu, hand_rcpu = _measure(
            server, messages, repeat, flow, keys, run_batch
        )
        figures.append(
            Figure(
                "calls",
                f"msg/s, {label} call, defaults",
                mine,
                baseline,
                hand,
                f">= {target:.0%} of it",
                mine / hand >= target,
                note=(
                    f"{label}: {messages:,} msgs over 4 strict levels, best of {repeat}; client "
                    f"CPU per msg {cpu:.1f} us (hand {hand_cpu:.1f}); Redis CPU per msg "
                    f"{rcpu:.1f} us (hand {hand_rcpu:.1f})"
                ),
            )
        )
    for label, handler in (("", "bench.handlers:io_wait"), (" sync", "bench.handlers:io_block")):
        flow = _flow(handler, keys=f"{PREFIX}:io", extra="    concurrency: 200\n")
        mine, *_ = _measure(server, io_messages, 1, flow, [f"{PREFIX}:io"], None)
        ideal = 200 / 0.05
        figures.append(
            Figure(
                "calls",
                f"msg/s, 50 ms{label} call, concurrency 200",
                mine,
                "ideal 200 / 50 ms",
                ideal,
                ">= 90% of it",
                mine / ideal >= 0.9,
                note=f"io{label}: {io_messages:,} msgs on one stream",
            )
        )
    return figures
