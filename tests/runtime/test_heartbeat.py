"""Agent heartbeats against a real Redis server: down, claim at once, events, back up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from projects import entries, make_project, module, pending, running, wait_for, write_module

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import resolve
from cortex_flow.runtime.heartbeat import HeartbeatMonitor
from cortex_flow.runtime.runner import Runner
from cortex_flow.runtime.stats import RunnerStats

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
            await wait_for(lambda: "crashed" in runner.heartbeats.runners, what="its beats")  # type: ignore[union-attr]
            assert handled == []
            beating.cancel()
            await wait_for(lambda: sorted(handled) == ["0", "1"], what="its pending claimed")
            await wait_for(lambda: _zero(redis_client, tasks), what="nothing pending")
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating


# --- runner names and instances ------------------------------------------------------------

NAMED_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      heartbeats: {key: "{P}heartbeats"}
    heartbeats:
      stream: heartbeats
    groups:
      work:
        stream: tasks
        routes:
          - drop: true
"""


def _named(tmp_path: Path, redis_url: str, key_prefix: str, flow: str = NAMED_FLOW) -> Path:
    return make_project(
        tmp_path,
        flow,
        url=redis_url,
        prefix=key_prefix,
        name="dup",
        runner_extra=", heartbeat_interval: 1s",
    )


async def _runner_beat(client: Any, key: str, instance: str, age: float = 0, **extra: str) -> None:
    ts = str(int((time.time() - age) * 1000))
    fields = {"agent": "dup", "kind": "runner", "status": "ok", "ts": ts, "instance": instance}
    await client.xadd(key, fields | extra)


async def test_a_live_runner_under_the_same_name_refuses_the_start(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """A recent beat of the name from another instance stops the start before any consumer."""
    config = _named(tmp_path, redis_url, key_prefix)
    await _runner_beat(redis_client, f"{key_prefix}heartbeats", "otherhost:4242:1700000000000")
    runner = Runner(load_project(config), admin=False, block=0.2)
    try:
        with pytest.raises(CortexFlowError) as refused:
            await runner.start()
    finally:
        await runner.stop(1)
    assert str(refused.value) == (
        "runner.name dup is already used by another runner (host otherhost pid 4242, beat 0s "
        "ago); give each runner its own name"
    )
    assert runner.consumers == {}
    assert not await redis_client.exists(f"{key_prefix}tasks")  # nothing was provisioned


async def test_old_stopped_and_own_earlier_beats_do_not_refuse_the_start(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """Beats older than 3 x interval, a "stopped" beat, and this host's dead pid are no twin."""
    config = _named(tmp_path, redis_url, key_prefix)
    key = f"{key_prefix}heartbeats"
    await _runner_beat(redis_client, key, "otherhost:1:1", age=3.5)
    await _runner_beat(redis_client, key, "otherhost:2:2", status="stopped")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    await _runner_beat(redis_client, key, f"{socket.gethostname()}:{dead.pid}:3")
    async with running(config) as runner:
        assert "work" in runner.consumers
        await wait_for(lambda: _beats(redis_client, key, runner.instance), what="own beats")
    # a stopped runner says so: the next one under the name need not wait
    [(_, last)] = await redis_client.xrevrange(key, count=1)
    assert (last["instance"], last["status"]) == (runner.instance, "stopped")
    host, pid, started = runner.instance.split(":")
    assert (host, int(pid)) == (socket.gethostname(), os.getpid()) and started.isdigit()


async def _beats(client: Any, key: str, instance: str) -> bool:
    """Whether ``instance`` beat on ``key`` (raw fields, or JSON in ``data``)."""
    found = [json.loads(f["data"]) if "data" in f else f for _, f in await client.xrange(key)]
    return any(f.get("instance") == instance for f in found)


async def test_beats_of_the_same_name_from_another_instance_are_not_ignored(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str, caplog: Any
) -> None:
    """Only the runner's own instance is ignored: a twin appearing later is warned about."""
    config = _named(tmp_path, redis_url, key_prefix)
    async with running(config) as runner:
        monitor = runner.heartbeats
        assert monitor is not None
        await _runner_beat(redis_client, f"{key_prefix}heartbeats", "elsewhere:77:1")
        await wait_for(
            lambda: (
                "runner.name dup is also used by another runner (host elsewhere pid 77)"
                in caplog.text
            ),
            what="the twin warning",
        )
        assert monitor.runners == {}  # never claimed for: those are our own consumer names


# --- the runner's own beat -------------------------------------------------------------------


class FailingClient:
    """Every XADD fails (Redis down); counts the attempts."""

    def __init__(self) -> None:
        self.attempts = 0

    async def xadd(self, *args: Any, **kwargs: Any) -> str:
        self.attempts += 1
        raise ConnectionError("Redis is down")


async def test_failing_own_beat_is_logged_at_most_once_a_minute(
    tmp_path: Path, caplog: Any
) -> None:
    """A beat that cannot be written is a warning, not silence, and not one per beat."""
    config = make_project(tmp_path, NAMED_FLOW, url="redis://127.0.0.1:1", prefix="cf:")
    client = FailingClient()
    monitor = HeartbeatMonitor(
        client,
        resolve(load_project(config).topology, "dup"),
        RunnerStats(runner="dup"),
        runner_interval=0.01,
        on_down=lambda name, min_idle: None,
        log=logging.getLogger("test.heartbeat"),
    )
    monitor.key = "cf:heartbeats"
    beating = asyncio.create_task(monitor._beat())
    try:
        await wait_for(lambda: client.attempts >= 5, what="five beats")
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    warnings = [r for r in caplog.records if r.name == "test.heartbeat"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage() == (
        "heartbeats: cannot write this runner's beat to cf:heartbeats (Redis is down); other "
        "runners may take it for down and claim its pending messages (logged once a minute)"
    )


# --- reloads and codecs ----------------------------------------------------------------------

RELOAD_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      beats_a: {key: "{P}beats:a"}
      beats_b: {key: "{P}beats:b", codec: json}
      events: {key: "{P}events", codec: json}
    agents:
      worker1:
        heartbeat: {interval: 200ms, timeout: 600ms}
    HEARTBEATS
    groups:
      work:
        stream: tasks
        routes:
          - drop: true
"""


def _reload_flow(heartbeats: str) -> str:
    return RELOAD_FLOW.replace("HEARTBEATS", heartbeats)


async def test_reload_keeps_known_runners_and_moves_to_a_new_heartbeat_stream(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """A reload keeps the runners seen; a new heartbeat key moves the beat and the watch."""
    old = "heartbeats: {stream: beats_a}"
    config = make_project(
        tmp_path,
        _reload_flow(old),
        url=redis_url,
        prefix=key_prefix,
        runner_extra=", heartbeat_interval: 100ms",
    )
    key_a, key_b = f"{key_prefix}beats:a", f"{key_prefix}beats:b"
    async with running(config) as runner:
        monitor = runner.heartbeats
        assert monitor is not None
        await redis_client.xadd(key_a, {"agent": "peer", "kind": "runner", "ts": _now()})
        await wait_for(lambda: "peer" in monitor.runners, what="the peer runner")

        # an unrelated change: the peer is still known
        (tmp_path / "flows" / "main.yaml").write_text(
            textwrap.dedent(_reload_flow(old)).replace("{P}", key_prefix).replace("200ms", "300ms")
        )
        assert (await runner.reload("test"))["outcome"] == "applied"
        assert "peer" in monitor.runners

        # the heartbeat stream moves to beats_b (codec json): beats and watch follow
        _write_flow(tmp_path, _reload_flow("heartbeats: {stream: beats_b}"), key_prefix)
        assert (await runner.reload("test"))["outcome"] == "applied"
        await wait_for(lambda: _beats(redis_client, key_b, runner.instance), what="beats on b")
        [(_, beat)] = (await redis_client.xrevrange(key_b, count=1))[:1]
        assert json.loads(beat["data"])["instance"] == runner.instance
        data = json.dumps({"agent": "worker1", "ts": int(time.time() * 1000)})
        await redis_client.xadd(key_b, {"data": data})
        agents = runner.stats.agents
        await wait_for(lambda: agents["worker1"].up is True, what="worker1 up, read from b")

        # heartbeats removed: the runner beats and watches on the default runner stream
        _write_flow(tmp_path, _reload_flow(""), key_prefix)
        assert (await runner.reload("test"))["outcome"] == "applied"
        default = f"{key_prefix}runners"
        assert monitor.key == default
        await wait_for(lambda: _beats(redis_client, default, runner.instance), what="beats")
        length = await redis_client.xlen(key_b)
        await asyncio.sleep(0.3)
        assert await redis_client.xlen(key_b) == length  # no more beats on the old stream


def _now() -> str:
    return str(int(time.time() * 1000))


def _write_flow(tmp_path: Path, flow: str, prefix: str) -> None:
    (tmp_path / "flows" / "main.yaml").write_text(textwrap.dedent(flow).replace("{P}", prefix))


async def test_on_down_event_uses_the_event_stream_codec(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """On a `codec: json` events stream the agent_down event is one `data` field of JSON."""
    flow = _reload_flow("heartbeats: {stream: beats_a, on_down: {to: events}}")
    config = make_project(tmp_path, flow, url=redis_url, prefix=key_prefix)
    async with running(config) as runner:
        await redis_client.xadd(f"{key_prefix}beats:a", {"agent": "worker1", "ts": _now()})
        agents = runner.stats.agents
        await wait_for(lambda: agents["worker1"].up is True, what="worker1 up")
        await wait_for(lambda: agents["worker1"].up is False, what="worker1 down")
        [(_, fields)] = await wait_for(lambda: redis_client.xrange(f"{key_prefix}events"))
    assert list(fields) == ["data"]
    event = json.loads(fields["data"])
    assert (event["type"], event["agent"], event["timeout"]) == ("agent_down", "worker1", "0.6s")
