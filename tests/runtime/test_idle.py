"""What an idle group, and an idle runner, send to Redis (issue 11, item 4)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from projects import NewProject, running, wait_for

from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import resolve
from cortex_flow.runtime.consumer import GroupConsumer
from cortex_flow.runtime.heartbeat import WATCH_BLOCK
from cortex_flow.runtime.reader import GroupReader
from cortex_flow.runtime.stats import AgentState
from cortex_flow.wire.groups import ensure_group

LOG = logging.getLogger("cortex_flow.consumer")


class Recording:
    """A client that records the commands the reader sends (name and keyword arguments)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def register_script(self, source: str) -> Any:
        script = self.client.register_script(source)

        async def run(**kwargs: Any) -> Any:
            self.sent.append(("script", kwargs))
            return await script(**kwargs)

        return run

    async def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(("xreadgroup", {"streams": list(args[2]), **kwargs}))
        return await self.client.xreadgroup(*args, **kwargs)


FLOW = """
    version: 1
    streams:
      tasks:
        key: "{P}tasks:{{ priority }}"
        priorities: [critical, high, normal, low]
      one: {key: "{P}one"}
    groups:
      levels:
        stream: tasks
        priority: PRIORITY
        routes:
          - drop: true
      single:
        stream: one
        routes:
          - drop: true
"""


@pytest.mark.parametrize(
    ("group", "priority"), [("single", "strict"), ("levels", "strict"), ("levels", "weighted")]
)
async def test_an_idle_group_waits_with_one_blocking_read_per_wait(
    new_project: NewProject, redis_client: Any, key_prefix: str, group: str, priority: str
) -> None:
    """Once a blocking read came back empty, each next wait is that one blocking XREADGROUP
    over every key of the group (no look first, no find-first script), and an entry added
    to any key (the lowest level too) is still read by it."""
    config, _ = new_project(FLOW.replace("PRIORITY", priority))
    resolved = resolve(load_project(config).topology, "t1").groups[group]
    for key in resolved.keys:
        await ensure_group(redis_client, key.key, group, "earliest")
    client = Recording(redis_client)
    reader = GroupReader(client, resolved, block_ms=20, cluster=False, sleep=asyncio.sleep, log=LOG)
    assert await reader.fetch(10) == []  # the first wait may look first
    client.sent.clear()
    for _ in range(3):
        assert await reader.fetch(10) == []
    every = [k.key for k in resolved.keys]
    assert client.sent == [("xreadgroup", {"streams": every, "count": 10, "block": 20})] * 3
    await redis_client.xadd(every[-1], {"n": "1"})
    client.sent.clear()
    got = await reader.fetch(10)
    assert [(e.key.key, e.fields) for e in got] == [(every[-1], {"n": "1"})]
    assert len(client.sent) == 1
    # busy again: the next read looks without blocking first (a backlog is not waited on)
    client.sent.clear()
    await reader.fetch(10, block=False)
    assert all("block" not in kwargs for _, kwargs in client.sent)


INBOXES = """
    version: 1
    agents: {AGENTS}
    streams:
      inbox: {key: "{P}messages:{{ agent }}"}
      done: {key: "{P}done"}
    groups: {GROUPS}
"""


async def test_a_runner_runs_more_idle_groups_than_a_default_connection_pool_holds(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """120 idle inbox groups each wait on a connection of their own (redis-py's default
    pool holds 100): a message to every inbox is still handled."""
    names = [f"a{i}" for i in range(120)]
    groups = {
        f"g-{name}": {"stream": "inbox", "vars": {"agent": name}, "routes": [{"to": "done"}]}
        for name in names
    }
    flows = INBOXES.replace("{AGENTS}", str({n: {} for n in names})).replace(
        "{GROUPS}", str(groups)
    )
    config, _ = new_project(flows)
    async with running(config):
        await asyncio.sleep(0.5)  # every group is waiting in its blocking read
        for name in names:
            await redis_client.xadd(f"{key_prefix}messages:{name}", {"to": name})

        async def all_done() -> bool:
            return int(await redis_client.xlen(f"{key_prefix}done")) == len(names)

        await wait_for(all_done, timeout=30)


STOPPING = """
    version: 1
    streams:
      one: {key: "{P}one"}
    groups:
      single:
        stream: one
        routes:
          - drop: true
"""


async def test_stop_ends_an_idle_wait_at_once(new_project: NewProject, key_prefix: str) -> None:
    """An idle consumer's long wait (5 s) does not hold up a stop with a 1 s grace: the
    stop ends the read, and every consumer stops cleanly (nothing was in flight)."""
    config, _ = new_project(STOPPING)
    async with running(config, grace=1.0) as runner:
        await asyncio.sleep(0.6)  # past the first short read: in the idle wait now
        assert runner.running is not None
        consumers = list(runner.running.consumers.values())
        assert consumers and all(
            isinstance(c, GroupConsumer) and c.idle_block_ms >= 5000 for c in consumers
        )
        assert all(await asyncio.gather(*(c.stop(1.0) for c in consumers)))


def test_the_heartbeat_watch_waits_until_the_next_timeout_at_most() -> None:
    """The watch's one blocking read lasts until an agent (or runner) could be past its
    timeout, ``WATCH_BLOCK`` at most; not a poll twice a second."""

    class Watch:
        runner_interval = 10.0

        def __init__(self, agents: dict[str, AgentState], runners: dict[str, float]) -> None:
            self.stats = type("Stats", (), {"agents": agents})()
            self.runners = runners

    from cortex_flow.runtime.heartbeat import HeartbeatMonitor

    block = HeartbeatMonitor._watch_block_ms
    now = time.time()
    idle = Watch({"a": AgentState("a", up=False, last_beat=now - 100, timeout=5)}, {})
    assert block(idle) == int(WATCH_BLOCK * 1000) + 10  # type: ignore[arg-type]
    soon = Watch({"a": AgentState("a", up=True, last_beat=now - 4, timeout=5)}, {})
    assert 500 <= block(soon) <= 1100  # type: ignore[arg-type]
    runner = Watch({}, {"r2": now - 28.0})  # silent for 3 x 10 s at now + 2 s
    assert 1500 <= block(runner) <= 2100  # type: ignore[arg-type]


def test_a_failing_heartbeat_watch_says_so_once_in_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A watch read failing every second (a failover, Redis down) is one warning per
    ten seconds with a count, not a line a second."""
    from types import SimpleNamespace

    from cortex_flow.runtime.heartbeat import HeartbeatMonitor

    watch = SimpleNamespace(
        log=logging.getLogger("cortex_flow.heartbeat"),
        _read_failures=0,
        _read_warned_at=None,
        _why=str,  # what the monitor says of an error (an ACL refusal with its fix)
    )
    caplog.set_level(logging.INFO)
    for _ in range(5):
        HeartbeatMonitor._read_failed(watch, "beats", ConnectionError("Connection refused"))  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "heartbeats: reading beats failed (Connection refused); retrying every second "
        "(1 time so far)"
    ]
    assert watch._read_failures == 5
