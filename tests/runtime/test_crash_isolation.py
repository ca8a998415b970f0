"""Runners that die mid-batch, against a real Redis: the innocent messages of the batch
cost one more delivery at most and are never dead-lettered; the message that kills its
runner every time is dead-lettered after max_deliveries, the reason saying how many
runners died holding it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from projects import NewProject, end, spawn_runner

FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      done: {key: "{P}done"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        dead_letter: dlq
        batch: 10
        concurrency: CONCURRENCY
        retry: {max_deliveries: 3, backoff: {initial: 50ms, max: 50ms}, claim_idle: 300ms}
        routes:
          - call: CALL
            continue: true
          - to: done
"""

HANDLERS = """
import os

LOG = "CALLS"

def handle(msg):
    with open(LOG, "a") as out:
        out.write(msg["n"] + "\\n")
    if msg["n"] == "5":
        calls = open(LOG).read().split().count("5")
        if FAIL_FIRST and calls == 1:
            raise ValueError("first try fails")
        os._exit(7)  # the runner dies holding this message and its neighbours
"""

CALLS = {
    "inline batch": ('{function: "{M}:handle", inline: true}', 1),
    "sync calls in threads": ('"{M}:handle"', 4),
}


def _run_until_settled(config: Callable[[int], Path], tmp_path: Path, raw: Any, prefix: str) -> int:
    """Start runners (``config(i)`` for the i-th) one after another until the dead letter
    is written and nothing is pending; how many of them died."""
    log, died = tmp_path / "runner.log", 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        process = spawn_runner(config(died), log)
        try:
            while process.poll() is None and time.monotonic() < deadline:
                settled = raw.exists(f"{prefix}dlq") and raw.xlen(f"{prefix}done") >= 9
                if settled and raw.xpending(f"{prefix}jobs", "work")["pending"] == 0:
                    process.terminate()
                    process.wait(timeout=30)
                    return died
                time.sleep(0.05)
            if process.poll() is not None:
                assert process.returncode == 7, log.read_text()[-3000:]
                died += 1
        finally:
            end(process)
    raise AssertionError(f"not settled after {died} deaths:\n{log.read_text()[-3000:]}")


# who takes back what the dead runner held: the same runner restarted (its own pending
# entries), or each time a runner of another name (XPENDING IDLE past claim_idle)
TAKERS = ["restarted", "another runner"]


@pytest.mark.parametrize("kind", list(CALLS))
@pytest.mark.parametrize("fail_first", [False, True])
@pytest.mark.parametrize("taker", TAKERS)
def test_a_message_that_kills_its_runner_takes_no_neighbour_with_it(
    new_project: NewProject,
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
    kind: str,
    fail_first: bool,
    taker: str,
) -> None:
    """Message 5 of 10 kills its runner (os._exit) each time it runs (after failing once,
    in the second case): the 9 others are published once each and run twice at most;
    message 5 is dead-lettered with "delivered 3 times; N runners died holding it" (on the
    previous main its neighbours were dead-lettered beside it)."""
    call, concurrency = CALLS[kind]
    calls_log = tmp_path / "calls.txt"
    handlers = HANDLERS.replace("CALLS", str(calls_log)).replace("FAIL_FIRST", str(fail_first))
    flow = FLOW.replace("CALL", call).replace("CONCURRENCY", str(concurrency))

    def config(i: int) -> Path:
        name = "r1" if taker == "restarted" else f"r{i + 1}"
        return new_project(flow, handlers, name=name)[0]

    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
        for n in range(10):
            raw.xadd(f"{key_prefix}jobs", {"n": str(n)})
        died = _run_until_settled(config, tmp_path, raw, key_prefix)
        done = [f["n"] for _, f in raw.xrange(f"{key_prefix}done")]
        [(_, dead)] = raw.xrange(f"{key_prefix}dlq")
    assert sorted(done, key=int) == [str(n) for n in range(10) if n != 5]
    calls = Counter(calls_log.read_text().split())
    assert all(calls[str(n)] <= 2 for n in range(10) if n != 5), calls
    assert dead["n"] == "5" and dead["dlq_deliveries"] == "3"
    if fail_first:
        assert died == 2
        assert (
            dead["dlq_error"] == "delivered 3 times; 2 runners died holding it, 1 delivery failed"
        )
    else:
        assert died == 3
        assert dead["dlq_error"] == "delivered 3 times; 3 runners died holding it"
