"""Agent heartbeats against a real Redis server: down, claim at once, events, back up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from projects import entries, make_project, module, pending, running, wait_for, write_module

FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      heartbeats: {key: "{P}heartbeats"}
      events: {key: "{P}events"}
    agents:
      worker1:
        heartbeat: {interval: 200ms, timeout: 600ms}
    heartbeats:
      stream: heartbeats
      on_down: {to: events}
    groups:
      work:
        stream: tasks
        retry: {claim_idle: 1h}
        routes:
          - call: {M}:handle
"""

RECORDER = """
    handled = []

    def handle(msg):
        handled.append(msg["n"])
"""


async def _beat(client: Any, key: str, agent: str) -> None:
    while True:
        await client.xadd(key, {"agent": agent, "ts": str(int(time.time() * 1000))})
        await asyncio.sleep(0.1)


async def _events(client: Any, key: str) -> list[tuple[str, str]]:
    return [(f["type"], f["agent"]) for _, f in await entries(client, key)]


async def test_silent_agent_goes_down_its_pending_is_claimed_and_it_comes_back(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """A silent agent is marked down with an event and its pending is claimed before claim_idle."""
    mod = write_module(tmp_path, RECORDER)
    config = make_project(tmp_path, FLOW, url=redis_url, prefix=key_prefix, mod=mod)
    tasks, beats, events = (f"{key_prefix}{s}" for s in ("tasks", "heartbeats", "events"))
    # the agent reads three tasks as its own consumer and never acknowledges them
    await redis_client.xgroup_create(tasks, "work", id="0", mkstream=True)
    for n in range(3):
        await redis_client.xadd(tasks, {"n": str(n)})
    await redis_client.xreadgroup("work", "worker1", {tasks: ">"}, count=3)
    beating = asyncio.create_task(_beat(redis_client, beats, "worker1"))
    try:
        async with running(config) as runner:
            agents = runner.stats.agents
            handled = module(mod).handled
            await wait_for(lambda: agents["worker1"].up is True, what="worker1 up")
            assert handled == []
            assert await pending(redis_client, tasks, "work") == 3

            beating.cancel()
            await wait_for(lambda: agents["worker1"].up is False, what="worker1 down")
            await wait_for(lambda: sorted(handled) == ["0", "1", "2"], what="its tasks claimed")
            await wait_for(lambda: _zero(redis_client, tasks), what="nothing pending")
            assert await _events(redis_client, events) == [("agent_down", "worker1")]

            beating = asyncio.create_task(_beat(redis_client, beats, "worker1"))
            await wait_for(lambda: agents["worker1"].up is True, what="worker1 up again")
            await wait_for(
                lambda: _is(
                    _events(redis_client, events),
                    [("agent_down", "worker1"), ("agent_up", "worker1")],
                ),
                what="the agent_up event",
            )
            assert runner.stats.groups["work"].keys[tasks].claimed == 3
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating


async def _zero(client: Any, key: str) -> bool:
    return await pending(client, key, "work") == 0


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_runner_that_stops_beating_has_its_pending_claimed(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """Another runner's pending is claimed once its runner heartbeats stop, not after claim_idle."""
    mod = write_module(tmp_path, RECORDER)
    config = make_project(
        tmp_path,
        FLOW,
        url=redis_url,
        prefix=key_prefix,
        mod=mod,
        name="alive",
        runner_extra=", heartbeat_interval: 200ms",
    )
    tasks, beats = f"{key_prefix}tasks", f"{key_prefix}heartbeats"
    await redis_client.xgroup_create(tasks, "work", id="0", mkstream=True)
    for n in range(2):
        await redis_client.xadd(tasks, {"n": str(n)})
    await redis_client.xreadgroup("work", "crashed", {tasks: ">"}, count=2)

    async def beat_as_runner() -> None:
        while True:
            ts = str(int(time.time() * 1000))
            await redis_client.xadd(beats, {"agent": "crashed", "kind": "runner", "ts": ts})
            await asyncio.sleep(0.1)

    beating = asyncio.create_task(beat_as_runner())
    try:
        async with running(config) as runner:
            handled = module(mod).handled
            await wait_for(lambda: "crashed" in runner._heartbeats.runners, what="its beats")  # type: ignore[union-attr]
            assert handled == []
            beating.cancel()
            await wait_for(lambda: sorted(handled) == ["0", "1"], what="its pending claimed")
            await wait_for(lambda: _zero(redis_client, tasks), what="nothing pending")
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
