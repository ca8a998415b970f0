"""Priority levels against a real Redis server: strict order, and weighted shares."""

from __future__ import annotations

import textwrap
from collections import Counter
from typing import Any

from projects import NewProject, module, running, wait_for

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
