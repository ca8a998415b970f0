"""Priority levels against a real Redis server: strict order, and weighted shares."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from collections import Counter
from typing import Any

from projects import NewProject, module, running, wait_for

from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import resolve
from cortex_flow.runtime.reader import GroupReader
from cortex_flow.wire.groups import ensure_group

LOG = logging.getLogger("cortex_flow.consumer")

LEVELS = ("critical", "high", "normal", "low")

RECORDER = """
    handled = []

    def record(msg):
        handled.append(msg["level"])
"""

FLOW = """
    version: 1
    streams:
      tasks:
        key: "{P}tasks:{{ priority }}"
        priorities: [critical, high, normal, low]
    groups:
      agents:
        stream: tasks
        concurrency: 1
        routes:
          - call: {M}:record
"""


def _flow(settings: str = "") -> str:
    """``FLOW`` with ``settings`` (YAML: how the group picks a level) added to its group."""
    return FLOW + textwrap.indent(textwrap.dedent(settings), " " * 8)


async def _publish(client: Any, prefix: str, counts: dict[str, int]) -> None:
    pipe = client.pipeline(transaction=False)
    for level, count in counts.items():
        for n in range(count):
            pipe.xadd(f"{prefix}tasks:{level}", {"level": level, "n": str(n)})
    await pipe.execute()


async def test_strict_priority_serves_every_higher_level_first(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """With a low backlog waiting, every critical is handled before any high, and so on down."""
    config, mod = new_project(_flow("priority: strict"), RECORDER)
    counts = {"low": 40, "normal": 10, "high": 10, "critical": 10}  # low published first
    await _publish(redis_client, key_prefix, counts)
    async with running(config):
        handled = module(mod).handled
        await wait_for(lambda: len(handled) == 70, what="all 70 messages")
    expected = [level for level in LEVELS for _ in range(counts[level])]
    assert handled == expected


async def test_weighted_priority_shares_follow_weights_and_none_starves(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """Under backlogs on every level, weighted reads split by weight and low still gets a share."""
    weighted = """
        priority: weighted
        weights: {critical: 8, high: 4, normal: 2, low: 1}
    """
    config, mod = new_project(_flow(weighted), RECORDER)
    await _publish(redis_client, key_prefix, dict.fromkeys(LEVELS, 60))
    async with running(config):
        handled = module(mod).handled
        await wait_for(lambda: len(handled) >= 60, what="the first 60 messages")
    first = Counter(handled[:60])  # 4 rounds of 15 picks: 32 / 16 / 8 / 4 when exact
    assert first["low"] >= 2, first
    assert first["critical"] > first["high"] > first["normal"] > first["low"], first
    assert 26 <= first["critical"] <= 38, first
    assert 12 <= first["high"] <= 20, first


SLOW_RECORDER = """
    import time

    handled = []

    def record(msg):
        time.sleep(0.01)
        handled.append(msg["level"])
"""


async def test_critical_arriving_during_a_low_backlog_is_taken_next(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """A critical message published while a low backlog drains is taken before the next low."""
    config, mod = new_project(_flow(), SLOW_RECORDER)  # default: strict
    await _publish(redis_client, key_prefix, {"low": 100})
    async with running(config):
        handled = module(mod).handled
        await wait_for(lambda: len(handled) >= 5, what="the backlog to start draining")
        await _publish(redis_client, key_prefix, {"critical": 3})
        seen_before = len(handled)
        await wait_for(lambda: handled.count("critical") == 3, what="the critical ones")
    first_critical = handled.index("critical")
    # at most the lows already taken: the one in flight and the one read ahead
    assert first_critical <= seen_before + 2
    assert handled[first_critical : first_critical + 3] == ["critical"] * 3


READ_FLOW = """
    version: 1
    streams:
      tasks:
        key: "{P}tasks:{{ priority }}"
        priorities: [critical, high, normal, low]
    groups:
      agents:
        stream: tasks
        routes:
          - drop: true
"""


async def test_strict_reads_take_one_level_at_a_time_and_park_what_came_along(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """One XREADGROUP over the levels down to the one last served: entries of a lower
    level read along with a higher one are parked (held, not handed out) until nothing
    waits above them, so a higher entry arriving meanwhile still comes first."""
    config, _ = new_project(READ_FLOW)
    group = resolve(load_project(config).topology, "t1").groups["agents"]
    for key in group.keys:
        await ensure_group(redis_client, key.key, "agents", "earliest")
    reader = GroupReader(
        redis_client, group, block_ms=20, cluster=False, sleep=asyncio.sleep, log=LOG
    )
    await _publish(redis_client, key_prefix, {"low": 6})

    def levels(entries: list[Any]) -> list[str]:
        return [e.fields["level"] + e.fields["n"] for e in entries]

    assert levels(await reader.fetch(2)) == ["low0", "low1"]  # four empty levels above
    await _publish(redis_client, key_prefix, {"critical": 1, "high": 2})
    # one read over every level: critical handed out, high and low parked
    assert levels(await reader.fetch(2)) == ["critical0"]
    assert levels(reader.parked) == ["high0", "high1", "low2", "low3"]
    await _publish(redis_client, key_prefix, {"critical": 1})
    assert levels(await reader.fetch(2)) == ["critical0"]  # (n restarts per publish)
    assert levels(await reader.fetch(2)) == ["high0", "high1"]  # nothing above: released
    assert levels(reader.parked) == ["low2", "low3"]
    await _publish(redis_client, key_prefix, {"normal": 1})
    assert levels(await reader.fetch(2)) == ["normal0"]  # above the parked lows
    assert levels(await reader.fetch(2)) == ["low2", "low3"]
    assert levels(await reader.fetch(2)) == ["low4", "low5"]
    assert await reader.fetch(2, block=False) == [] and reader.parked == []
    delivered = 0
    for key in group.keys:
        delivered += (await redis_client.xpending(key.key, "agents"))["pending"]
    assert delivered == 6 + 1 + 2 + 1 + 1  # every entry read exactly once
