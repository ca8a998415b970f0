"""Benchmark: the gateway, against redis-py talking to Redis directly, in the same run.

publish: ``POST /v1/streams/tasks`` requests per second through the gateway (aiohttp
client, 32 in flight, gateway in the same process), against redis-py XADD (32 in
flight). inbox: messages per second over one WebSocket (credit 1,000, each acked by ID),
against a hand-written XREADGROUP COUNT 100 + XACK loop. Informational: no target; the
gateway adds an HTTP request (or a frame and its ack) per message by design.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.common import Figure, Server, free_port
from cortex_flow.flow.loader import load_project
from cortex_flow.gateway import Gateway
from cortex_flow.wire.access import connect

TOKEN = "bench-token-0123456789abcdef"
IN_FLIGHT = 32
FLOW = """\
version: 1
streams:
  tasks: {key: "bench:gw:tasks"}
  inbox: {key: "bench:gw:inbox:{{ agent }}"}
agents:
  bench: {token: "${BENCH_TOKEN}", may_send: [tasks], inbox: {}}
"""


async def _spread(count: int, one: Any) -> float:
    """Run ``one()`` ``count`` times, IN_FLIGHT at once; the seconds it took."""
    left = iter(range(count))

    async def worker() -> None:
        for _ in left:
            await one()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return time.perf_counter() - began


async def _bench(server: Server, publishes: int, messages: int) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="cortex-bench-gw-") as tmp:
        root = Path(tmp)
        (root / "flows").mkdir()
        (root / "flows" / "main.yaml").write_text(FLOW)
        port = free_port()
        (root / "config.yaml").write_text(
            f"redis: {{url: '{server.url}'}}\n"
            f"gateway: {{listen: '127.0.0.1:{port}', max_credit: 1000}}\n"
        )
        proj = load_project(root / "config.yaml", env={"BENCH_TOKEN": TOKEN})
        direct = aioredis.Redis.from_url(server.url, decode_responses=True)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        base = f"http://127.0.0.1:{port}"
        try:
            async with (
                Gateway(lambda: proj, lambda: connect(server.url)),
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT)) as http,
            ):

                async def post() -> None:
                    async with http.post(
                        f"{base}/v1/streams/tasks", json={"n": "1"}, headers=headers
                    ) as r:
                        assert r.status == 202, await r.text()

                async def xadd() -> None:
                    await direct.xadd("bench:gw:direct", {"n": "1"})

                via_gateway = publishes / await _spread(publishes, post)
                via_redis = publishes / await _spread(publishes, xadd)
                inbox = "bench:gw:inbox:bench"
                await _preload(direct, inbox, messages)
                socket_rate = messages / await _websocket(http, base, headers, messages)
                await direct.delete(inbox)
                await _preload(direct, inbox, messages)
                loop_rate = messages / await _read_loop(direct, inbox, messages)
        finally:
            await direct.delete("bench:gw:tasks", "bench:gw:direct", "bench:gw:inbox:bench")
            await direct.aclose()
    return [
        Figure("gateway", "publish requests/s", via_gateway, "redis-py XADD", via_redis, "-", None),
        Figure(
            "gateway",
            "inbox messages/s (1 WebSocket)",
            socket_rate,
            "XREADGROUP+XACK loop",
            loop_rate,
            "-",
            None,
        ),
    ]


async def _preload(client: Any, key: str, count: int) -> None:
    await client.delete(key)
    await client.xgroup_create(key, "bench", "0", mkstream=True)
    for start in range(0, count, 1000):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(count, start + 1000)):
            pipe.xadd(key, {"n": str(n)})
        await pipe.execute()


async def _websocket(http: aiohttp.ClientSession, base: str, headers: Any, count: int) -> float:
    """Ack by 100 (one frame, one XACK), as a client that batches would."""
    acked = 0
    held: list[str] = []
    began = time.perf_counter()
    async with http.ws_connect(f"{base}/v1/agents/bench/inbox", headers=headers) as ws:
        await ws.send_json({"credit": 1000})
        while acked < count:
            frame = await ws.receive_json()
            if frame["type"] == "message":
                held.append(frame["id"])
            elif frame["type"] == "acked":
                acked += len(frame["ids"])
                await ws.send_json({"credit": len(frame["ids"])})
            if len(held) >= 100 or (held and acked + len(held) >= count):
                await ws.send_json({"ack": held})
                held = []
    return time.perf_counter() - began


async def _read_loop(client: Any, key: str, count: int) -> float:
    done = 0
    began = time.perf_counter()
    while done < count:
        reply = await client.xreadgroup("bench", "bench", {key: ">"}, count=100, block=1000)
        ids = [entry_id for entry_id, _ in reply[0][1]] if reply else []
        if ids:
            await client.xack(key, "bench", *ids)
            done += len(ids)
    return time.perf_counter() - began


def run(server: Server, publishes: int, messages: int) -> list[Figure]:
    return asyncio.run(_bench(server, publishes, messages))
