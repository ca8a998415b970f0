"""Sync calls stuck past their timeout, against a real Redis: each group has its own
bound of stuck threads (max_stuck_calls); at it the group holds new messages back and
says so (log, readiness detail, metric), and other groups keep being served."""

from __future__ import annotations

from typing import Any

import pytest
from projects import NewProject, module, none_pending, running, wait_for

from cortex_flow.runtime.metrics import RunnerCollector

FLOW = """
    version: 1
    streams:
      slow: {key: "{P}slow"}
      fast: {key: "{P}fast"}
      dlq: {key: "{P}dlq"}
    groups:
      hang:
        stream: slow
        concurrency: 4
        max_stuck_calls: 8
        dead_letter: dlq
        retry: {max_deliveries: 3, backoff: {initial: 50ms, max: 50ms}}
        routes:
          - call: {function: "{M}:hang", timeout: 1s}
      good:
        stream: fast
        concurrency: 1
        dead_letter: dlq
        routes:
          - call: "{M}:good"
"""

HANDLERS = """
import threading

release = threading.Event()
hung = []
handled = []

def hang(msg):
    hung.append(msg["n"])
    release.wait(600)  # as good as forever; the test releases it at teardown

def good(msg):
    handled.append(msg["n"])
"""


def _held_back(collector: RunnerCollector) -> float:
    for family in collector.collect():
        if family.name == "cortex_flow_group_held_back":
            return sum(s.value for s in family.samples if s.labels["group"] == "hang")
    raise AssertionError("no cortex_flow_group_held_back metric")


async def test_hanging_sync_calls_hold_back_their_group_only(
    new_project: NewProject,
    redis_client: Any,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """20 handlers hang in group hang (concurrency 4, 8 stuck allowed): it holds back at
    8 stuck, says so, and 40 messages of group good are then all delivered once: the 8
    stuck threads fill the pool's 8, but stuck threads do not count against it (on the
    previous main the setting did not exist). Released, the hung messages are all
    acknowledged and none is dead-lettered."""
    config, mod = new_project(FLOW, HANDLERS)
    for n in range(20):
        await redis_client.xadd(f"{key_prefix}slow", {"n": str(n)})
    async with running(config) as runner:
        handlers = module(mod)
        try:
            stats = runner.stats.groups["hang"]
            await wait_for(lambda: stats.held_back, timeout=20, what="group hang held back")
            assert stats.overrunning >= 8
            detail = runner.ready()[1]["stuck_calls"]["hang"]
            assert detail["held_back"] and detail["max_stuck_calls"] == 8
            assert _held_back(RunnerCollector(runner.stats)) == 1.0
            assert "max_stuck_calls 8" in caplog.text
            for n in range(40):
                await redis_client.xadd(f"{key_prefix}fast", {"n": str(n)})
            await wait_for(lambda: len(handlers.handled) == 40, timeout=20, what="40 good ones")
            assert sorted(handlers.handled, key=int) == [str(n) for n in range(40)]
            await wait_for(lambda: none_pending(redis_client, f"{key_prefix}fast", "good"))
        finally:
            handlers.release.set()
        await wait_for(
            lambda: none_pending(redis_client, f"{key_prefix}slow", "hang"),
            timeout=20,
            what="the hung messages acknowledged once released",
        )
        assert not stats.held_back
    assert await redis_client.xlen(f"{key_prefix}dlq") == 0
