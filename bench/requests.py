"""Benchmark: request/reply round trips between two processes, through Redis.

A responder process answers requests with :func:`bench.handlers.answer`; this process
asks. Two figures each side: round trips per second with 64 requests in flight (closed
loop), and the latency of requests sent at a steady 1,000 per second (open loop), p50
and p99. cortex-flow: a Runner answering a ``call`` group, ``Client.request`` asking.
Baseline: the hand-written redis-py request/reply: XADD with a correlation id and a reply
key; the responder XREADGROUPs, XADDs the reply and XACKs in one MULTI; the asker reads
its reply stream with XREAD BLOCK and wakes the waiting request.
Target: cortex-flow's p99 at 1,000 requests/s under 10 ms on loopback.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from bench import handlers
from bench.common import Figure, Server, project
from bench.latency import percentile
from cortex_flow.client import Client
from cortex_flow.runtime.runner import Runner

KEY = "bench:ask"
GROUP = "answer"
TARGET_MS = 10.0
RATE = 1000.0
IN_FLIGHT = 64

FLOW = f"""\
version: 1
streams:
  ask: {{key: "{KEY}"}}
groups:
  {GROUP}:
    stream: ask
    routes:
      - call: bench.handlers:answer
"""

Ask = Callable[[int], Awaitable[Any]]


# -- the responders (each in its own process) ------------------------------------------------


def cortex_responder(port: int, ready: Any, stop: Any, cpu: Any) -> None:
    server = Server()
    server.port = port

    async def serve() -> None:
        with project(server, FLOW) as proj:
            runner = Runner(proj, admin=False)
            await runner.start()
            began = time.process_time()
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            cpu.value = time.process_time() - began
            await runner.stop(grace=5)

    asyncio.run(serve())


def hand_responder(port: int, ready: Any, stop: Any, cpu: Any) -> None:
    client: Any = redis.Redis(port=port, decode_responses=True)  # typed loosely, as replies vary
    client.xgroup_create(KEY, GROUP, id="0", mkstream=True)
    began = time.process_time()
    ready.set()
    loop = asyncio.new_event_loop()
    while not stop.is_set():
        reply = client.xreadgroup(GROUP, "hand", {KEY: ">"}, count=100, block=100)
        if not reply:
            continue
        pipe = client.pipeline(transaction=True)
        for entry_id, fields in reply[0][1]:
            result = loop.run_until_complete(handlers.answer(fields))
            body = {"corr": fields["corr"], "data": json.dumps(result)}
            pipe.xadd(fields["reply"], body, maxlen=1000, approximate=True)
            pipe.xack(KEY, GROUP, entry_id)
        pipe.execute()
    cpu.value = time.process_time() - began
    client.close()


# -- the askers ----------------------------------------------------------------------------


class HandAsker:
    """The hand-written requester: one reply stream, one reader, futures by correlation."""

    def __init__(self, server: Server) -> None:
        self.redis: Any = server.aclient()
        self.reply = f"bench:replies:{uuid.uuid4().hex}"
        self.waiting: dict[str, asyncio.Future[Any]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        last = "$"
        while True:
            reply = await self.redis.xread({self.reply: last}, count=500, block=1000)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    future = self.waiting.pop(fields["corr"], None)
                    if future is not None and not future.done():
                        future.set_result(json.loads(fields["data"]))

    async def ask(self, n: int) -> Any:
        if self.reader is None:
            self.reader = asyncio.create_task(self.read())
            await asyncio.sleep(0.05)  # its XREAD is waiting
        corr = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.waiting[corr] = future
        await self.redis.xadd(KEY, {"n": str(n), "corr": corr, "reply": self.reply})
        return await asyncio.wait_for(future, 30)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.redis.aclose()


async def closed_loop(ask: Ask, total: int) -> float:
    """Round trips per second with IN_FLIGHT requests always out."""
    counter = iter(range(total))

    async def worker() -> None:
        for n in counter:
            await ask(n)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return total / (time.perf_counter() - began)


async def open_loop(ask: Ask, total: int) -> list[float]:
    """Latencies (ms) of ``total`` requests sent at RATE per second."""
    latencies: list[float] = []

    async def one(n: int) -> None:
        began = time.perf_counter()
        await ask(n)
        latencies.append((time.perf_counter() - began) * 1000)

    tasks = []
    start = time.perf_counter()
    for n in range(total):
        delay = start + n / RATE - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    return latencies


class Side:
    """One contender's run: round trips/s, latencies (ms), CPU per request (us) of the
    asker and of the responder, over both loops."""

    def __init__(self, rate: float, latencies: list[float]) -> None:
        self.rate = rate
        self.latencies = latencies
        self.asker_us = 0.0
        self.responder_us = 0.0


def measure(server: Server, side: str, total: int) -> Side:
    server.flush()
    ctx = mp.get_context("spawn")
    ready, stop, cpu = ctx.Event(), ctx.Event(), ctx.Value("d", 0.0)
    target = cortex_responder if side == "cortex" else hand_responder
    proc = ctx.Process(target=target, args=(server.port, ready, stop, cpu))
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError(f"the {side} responder did not start")

        async def go() -> tuple[float, list[float]]:
            if side == "cortex":
                with project(server, FLOW) as proj:
                    client = Client(proj, server.aclient(), owns=True)
                    try:
                        await client.request("ask", {"n": -1}, timeout=30)  # warm up
                        rate = await closed_loop(
                            lambda n: client.request("ask", {"n": n}, timeout=30), total
                        )
                        lat = await open_loop(
                            lambda n: client.request("ask", {"n": n}, timeout=30), total
                        )
                    finally:
                        await client.aclose()
                return rate, lat
            hand = HandAsker(server)
            try:
                await hand.ask(-1)
                return await closed_loop(hand.ask, total), await open_loop(hand.ask, total)
            finally:
                await hand.close()

        began = time.process_time()
        result = Side(*asyncio.run(go()))
        result.asker_us = (time.process_time() - began) / (2 * total) * 1e6
    finally:
        stop.set()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join()
    result.responder_us = cpu.value / (2 * total) * 1e6
    return result


def run(server: Server, total: int) -> list[Figure]:
    hand = measure(server, "hand", total)
    mine = measure(server, "cortex", total)
    base_rate, base_lat, rate, lat = hand.rate, hand.latencies, mine.rate, mine.latencies
    p99 = percentile(lat, 0.99)
    cpu = (
        f"CPU per request: asker {mine.asker_us:.0f} us (hand {hand.asker_us:.0f}), "
        f"responder {mine.responder_us:.0f} us (hand {hand.responder_us:.0f})"
    )
    baseline = "hand redis-py request/reply"
    return [
        Figure(
            "requests",
            f"round trips/s, {IN_FLIGHT} in flight",
            rate,
            baseline,
            base_rate,
            "(reference)",
            None,
        ),
        Figure(
            "requests",
            f"p50 ms at {RATE:g}/s",
            percentile(lat, 0.5),
            baseline,
            percentile(base_lat, 0.5),
            "(reference)",
            None,
        ),
        Figure(
            "requests",
            f"p99 ms at {RATE:g}/s",
            p99,
            baseline,
            percentile(base_lat, 0.99),
            f"<= {TARGET_MS:g} ms",
            p99 <= TARGET_MS,
            note=f"{total} requests each; max {max(lat):.1f} ms; {cpu}",
        ),
    ]
