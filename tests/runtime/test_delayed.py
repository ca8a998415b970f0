"""Delayed messages: held in Redis, moved by one runner at a time, never early, never
lost or doubled, moved later when no runner was up."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from projects import end, make_project, running, spawn_runner, wait_for

from cortex_flow.client import Client
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import namespace
from cortex_flow.wire.delayed import cancel, listing, waiting

FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      done: {key: "{P}done"}
    groups:
      work:
        stream: tasks
        routes:
          - to: done
"""

FAST = ", duty_lease: 1s, heartbeat_interval: 500ms"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        end(process)


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


async def test_three_runners_deliver_each_delayed_message_once_and_never_early(
    tmp_path: Path,
    redis_url: str,
    redis_client: Any,
    key_prefix: str,
    processes: list[subprocess.Popen[str]],
) -> None:
    """Sixty messages delayed 0.2s to 3s with three runner processes up: each reaches the
    stream exactly once (counted by n), its entry ID (the server's clock) never before
    its due time, and nothing stays held."""
    configs = [
        make_project(
            tmp_path,
            FLOW,
            url=redis_url,
            prefix=key_prefix,
            name=name,
            runner_extra=FAST,
            config_name=f"{name}.yaml",
        )
        for name in ("r1", "r2", "r3")
    ]
    for config in configs:
        processes.append(spawn_runner(config, tmp_path / f"{config.stem}.log"))
    project = load_project(configs[0])
    due: dict[str, int] = {}
    async with Client(project, redis_client) as client:
        for n in range(60):
            ident = await client.send_task({"n": str(n)}, delay=0.2 + (n % 30) * 0.1)
            found = await listing(redis_client, namespace(project.topology))
            due[str(n)] = next(d.due_ms for d in found if d.id == ident)
    tasks = f"{key_prefix}tasks"

    async def all_moved() -> bool:
        return int(await redis_client.xlen(tasks)) >= 60

    await wait_for(all_moved, timeout=30, what="every delayed message moved")
    rows = await redis_client.xrange(tasks)
    counts = Counter(fields["n"] for _, fields in rows)
    assert counts == Counter({str(n): 1 for n in range(60)})
    early = [(f["n"], i) for i, f in rows if _ms(i) < due[f["n"]]]
    assert early == []
    assert await waiting(redis_client, namespace(project.topology)) == {}
    await wait_for(
        lambda: _equal(redis_client.xlen(f"{key_prefix}done"), 60), timeout=20, what="handled"
    )


async def _equal(value: Any, expected: int) -> bool:
    return int(await value) == expected


async def test_a_message_due_while_no_runner_was_up_is_moved_by_the_next_one(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """Published with no runner up and due before one starts: the first runner moves it
    (and it is handled)."""
    config = make_project(tmp_path, FLOW, url=redis_url, prefix=key_prefix, runner_extra=FAST)
    project = load_project(config)
    async with Client(project, redis_client) as client:
        await client.send_task({"n": "1"}, delay=0.05)
    await wait_for(
        lambda: _past_due(redis_client, namespace(project.topology)), what="due time passed"
    )
    assert await redis_client.xlen(f"{key_prefix}tasks") == 0
    async with running(config):
        await wait_for(
            lambda: _equal(redis_client.xlen(f"{key_prefix}done"), 1), timeout=10, what="moved"
        )
    assert await waiting(redis_client, namespace(project.topology)) == {}


async def _past_due(client: Any, ns: str) -> bool:
    seconds, micros = await client.time()
    now = seconds * 1000 + micros // 1000
    return all(due < now for _, due in (await waiting(client, ns)).values())


async def test_delayed_messages_are_listed_and_a_cancelled_one_is_never_delivered(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """`listing` shows what waits with its stream key; `cancel` removes one, and only the
    other is delivered when due."""
    config = make_project(tmp_path, FLOW, url=redis_url, prefix=key_prefix, runner_extra=FAST)
    project = load_project(config)
    ns = namespace(project.topology)
    async with Client(project, redis_client) as client:
        keep = await client.send_task({"n": "keep"}, delay=0.5)
        drop = await client.send_task({"n": "drop"}, delay=0.5)
    found = {d.id: d for d in await listing(redis_client, ns)}
    assert set(found) == {keep, drop}
    assert found[drop].key == f"{key_prefix}tasks" and found[drop].fields == {"n": "drop"}
    assert (await waiting(redis_client, ns))[f"{key_prefix}tasks"][0] == 2
    cancelled = await cancel(redis_client, ns, drop)
    assert cancelled is not None and cancelled.id == drop
    assert await cancel(redis_client, ns, drop) is None
    async with running(config):
        await wait_for(
            lambda: _equal(redis_client.xlen(f"{key_prefix}done"), 1), timeout=10, what="moved"
        )
    assert [f["n"] for _, f in await redis_client.xrange(f"{key_prefix}tasks")] == ["keep"]
