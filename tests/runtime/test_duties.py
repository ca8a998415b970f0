"""Duties across runner processes on shared flows: each done once, taken over on a death."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from projects import (
    end,
    make_project,
    module,
    none_pending,
    running,
    spawn_runner,
    wait_for,
    write_module,
)

from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import resolve
from cortex_flow.wire.duties import holder_of

FAST_DUTIES = (
    ", duty_lease: 1s, retention_interval: 200ms, heartbeat_interval: 500ms, dead_consumer_idle: 2s"
)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Runner processes a test starts; any still running at the end are killed by pid."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        end(process)


def _runners(
    tmp_path: Path,
    flows: str,
    names: list[str],
    redis_url: str,
    prefix: str,
    mod: str,
    started: list[subprocess.Popen[str]],
) -> dict[str, tuple[Path, subprocess.Popen[str]]]:
    """One `cortex-flow run` process per name on the same flows; name -> (log, process)."""
    out = {}
    for name in names:
        config = make_project(
            tmp_path,
            flows,
            url=redis_url,
            prefix=prefix,
            mod=mod,
            name=name,
            grace="2s",
            runner_extra=FAST_DUTIES,
            config_name=f"{name}.yaml",
        )
        log = tmp_path / f"{name}.log"
        process = spawn_runner(config, log, env={"PYTHONPATH": str(tmp_path)})
        started.append(process)
        out[name] = (log, process)
    return out


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def _log(path: Path) -> str:
    return path.read_text() if path.exists() else ""


# --- agent events ------------------------------------------------------------------------

EVENTS_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      heartbeats: {key: "{P}heartbeats"}
      events: {key: "{P}events"}
    agents:
      worker1:
        heartbeat: {interval: 500ms, timeout: 2s}
    heartbeats:
      stream: heartbeats
      on_down: {to: events}
    groups:
      work:
        stream: tasks
        routes:
          - drop: true
"""


async def _beat_for(client: Any, key: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await client.xadd(key, {"agent": "worker1", "ts": str(int(time.time() * 1000))})
        await asyncio.sleep(0.1)


def _all_saw(logs: list[Path], text: str, times: int) -> bool:
    return all(_log(log).count(text) >= times for log in logs)


async def test_three_runners_publish_one_event_per_agent_transition(
    tmp_path: Path,
    redis_url: str,
    redis_client: Any,
    key_prefix: str,
    processes: list[subprocess.Popen[str]],
) -> None:
    """Every runner sees the agent go down, up and down again; the events stream gets
    exactly one agent_down, one agent_up and one agent_down."""
    runners = _runners(
        tmp_path, EVENTS_FLOW, ["r1", "r2", "r3"], redis_url, key_prefix, "", processes
    )
    logs = [log for log, _ in runners.values()]
    beats, events = f"{key_prefix}heartbeats", f"{key_prefix}events"
    await wait_for(
        lambda: _all_saw(logs, "running 1 group(s)", 1), timeout=30, what="runners started"
    )
    await _beat_for(redis_client, beats, 2.5)
    await wait_for(lambda: _all_saw(logs, "agent worker1 is down", 1), what="first down")
    await _beat_for(redis_client, beats, 2.5)
    await wait_for(lambda: _all_saw(logs, "agent worker1 is up again", 1), what="up again")
    await wait_for(lambda: _all_saw(logs, "agent worker1 is down", 2), what="second down")
    kinds = [f["type"] for _, f in await redis_client.xrange(events)]
    assert kinds == ["agent_down", "agent_up", "agent_down"]
    for _, process in runners.values():
        _stop(process)
    assert [f["type"] for _, f in await redis_client.xrange(events)] == kinds


# --- a runner killed with work in flight -------------------------------------------------

CLAIM_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks", retention: {max_len: 1000}}
    groups:
      work:
        stream: tasks
        concurrency: 4
        batch: 4
        retry: {claim_idle: 5m}
        routes:
          - call: {M}:handle
"""


def _recorder(path: Path) -> str:
    return f"""
        import time

        def handle(msg):
            time.sleep(float(msg["pause"]))
            with open({str(path)!r}, "a") as out:
                out.write(msg["n"] + "\\n")
    """


def _done(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def _pending_of(client: Any, key: str, consumer: str) -> int:
    rows = await client.xpending_range(key, "work", "-", "+", 1000, consumername=consumer)
    return len(rows)


async def test_a_killed_runner_s_entries_are_handled_once_and_its_duties_taken_over(
    tmp_path: Path,
    redis_url: str,
    redis_client: Any,
    key_prefix: str,
    processes: list[subprocess.Popen[str]],
) -> None:
    """Three runners, no heartbeats section: the one holding the retention duty is
    SIGKILLed with entries in flight. Within seconds another runner holds the duty with a
    higher token, the survivors notice the silence, and each of its entries is claimed by
    one of them and handled exactly once (counted by message); its consumer, idle and
    with nothing pending any more, is then deleted from the group."""
    done = tmp_path / "done.txt"
    mod = write_module(tmp_path, _recorder(done))
    runners = _runners(
        tmp_path, CLAIM_FLOW, ["r1", "r2", "r3"], redis_url, key_prefix, mod, processes
    )
    logs = {name: log for name, (log, _) in runners.items()}
    await wait_for(
        lambda: _all_saw(list(logs.values()), "running 1 group(s)", 1),
        timeout=30,
        what="runners started",
    )
    project = load_project(tmp_path / "r1.yaml")
    lease = resolve(project.topology, "r1").duty_key("retention")
    holding = await wait_for(lambda: holder_of(redis_client, lease), what="a retention holder")
    victim_pid = int(holding[1].split(":")[1])
    [victim] = [n for n, (_, p) in runners.items() if p.pid == victim_pid]
    tasks = f"{key_prefix}tasks"
    pipe = redis_client.pipeline(transaction=False)
    for n in range(36):
        pipe.xadd(tasks, {"n": str(n), "pause": "2"})
    await pipe.execute()
    await wait_for(
        lambda: _holds(redis_client, tasks, victim), timeout=15, what="the victim holding work"
    )
    os.kill(victim_pid, signal.SIGKILL)
    runners[victim][1].wait()
    held = await _pending_of(redis_client, tasks, victim)
    assert held > 0

    taken = await wait_for(
        lambda: _taken_over(redis_client, lease, victim_pid), timeout=10, what="the takeover"
    )
    assert taken[0] > holding[0]
    survivors = [logs[n] for n in logs if n != victim]
    await wait_for(
        lambda: any(f"runner {victim} stopped beating" in _log(log) for log in survivors),
        timeout=15,
        what="the silence noticed",
    )
    await wait_for(lambda: len(_done(done)) >= 36, timeout=40, what="every entry handled")
    await wait_for(lambda: none_pending(redis_client, tasks, "work"), what="nothing pending")
    counts = Counter(_done(done))
    assert sorted(counts, key=int) == [str(n) for n in range(36)]
    assert set(counts.values()) == {1}, counts
    await wait_for(
        lambda: _consumer_gone(redis_client, tasks, victim), timeout=15, what="its consumer gone"
    )
    for name, (_, process) in runners.items():
        if name != victim:
            _stop(process)
    assert Counter(_done(done)) == counts


async def _holds(client: Any, key: str, consumer: str) -> bool:
    return await _pending_of(client, key, consumer) > 0


async def _consumer_gone(client: Any, key: str, consumer: str) -> bool:
    return consumer not in {c["name"] for c in await client.xinfo_consumers(key, "work")}


async def _taken_over(client: Any, lease: str, dead_pid: int) -> tuple[int, str] | None:
    found = await holder_of(client, lease)
    if found is None or int(found[1].split(":")[1]) == dead_pid:
        return None
    return found


# --- dead consumers ----------------------------------------------------------------------

DEAD_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
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


async def test_dead_consumers_are_deleted_only_once_their_entries_are_claimed(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """A consumer no runner beats for, idle past dead_consumer_idle, loses its pending
    entries to a live runner first (each handled once) and is deleted after; an empty
    one is deleted at once; the runner's own consumer stays."""
    mod = write_module(tmp_path, RECORDER)
    config = make_project(
        tmp_path,
        DEAD_FLOW,
        url=redis_url,
        prefix=key_prefix,
        mod=mod,
        runner_extra=", dead_consumer_idle: 1s, duty_lease: 1s",
    )
    tasks = f"{key_prefix}tasks"
    await redis_client.xgroup_create(tasks, "work", id="0", mkstream=True)
    for n in range(5):
        await redis_client.xadd(tasks, {"n": str(n)})
    await redis_client.xreadgroup("work", "ghost", {tasks: ">"}, count=5)
    await redis_client.xgroup_createconsumer(tasks, "work", "empty")
    async with running(config) as runner:
        await wait_for(
            lambda: _consumers(redis_client, tasks, {runner.name}), timeout=20, what="deletions"
        )
        await wait_for(lambda: none_pending(redis_client, tasks, "work"), what="nothing pending")
        assert sorted(module(mod).handled) == ["0", "1", "2", "3", "4"]
        assert runner.running is not None and runner.running.dead_consumers is not None
        assert runner.running.dead_consumers.deleted == 2


async def _consumers(client: Any, key: str, names: set[str]) -> bool:
    return {c["name"] for c in await client.xinfo_consumers(key, "work")} == names
