"""A handler that raises SystemExit, KeyboardInterrupt or GeneratorExit fails its own
message only, against a real Redis: the runner goes on and every other message is
delivered."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from projects import NewProject, module, none_pending, running, wait_for

FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        dead_letter: dlq
        batch: 5
        concurrency: 4
        retry: {max_deliveries: 2, backoff: {initial: 50ms, max: 50ms}}
        routes:
          - call: ROUTE
"""

HANDLERS = """
import sys

handled = []

def _check(msg):
    if msg["n"] == "3":
        raise EXIT
    handled.append(msg["n"])

def handle(msg):
    _check(msg)

async def handle_async(msg):
    _check(msg)
"""

ROUTES = {
    "sync": '"{M}:handle"',
    "inline sync": '{function: "{M}:handle", inline: true}',
    "async": '"{M}:handle_async"',
    "inline async": '{function: "{M}:handle_async", inline: true}',
}

EXITS = {
    "SystemExit": ("sys.exit(3)", "SystemExit(3)"),
    "KeyboardInterrupt": ("KeyboardInterrupt()", "KeyboardInterrupt()"),
    "GeneratorExit": ("GeneratorExit('closed')", "GeneratorExit('closed')"),
}


@pytest.mark.parametrize("kind", list(ROUTES))
@pytest.mark.parametrize("exit_", list(EXITS))
async def test_a_handler_that_exits_fails_its_message_and_the_runner_goes_on(
    new_project: NewProject,
    redis_client: Any,
    redis_url: str,
    key_prefix: str,
    kind: str,
    exit_: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Message 3's handler exits: it is dead-lettered after max_deliveries with the
    handler's name in the reason and the log; the 9 others are handled once each (on the
    previous main an async handler's sys.exit() ended the runner)."""
    raised, shown = EXITS[exit_]
    handlers = HANDLERS.replace("raise EXIT", f"raise {raised}" if "(" in raised else raised)
    if raised.startswith("sys.exit"):
        handlers = handlers.replace("raise sys.exit(3)", "sys.exit(3)")
    config, mod = new_project(FLOW.replace("ROUTE", ROUTES[kind]), handlers)
    jobs = f"{key_prefix}jobs"
    for n in range(10):
        await redis_client.xadd(jobs, {"n": str(n)})
    async with running(config):
        await wait_for(lambda: redis_client.xlen(f"{key_prefix}dlq"), what="the dead letter")
        await wait_for(lambda: none_pending(redis_client, jobs, "work"), what="all acknowledged")
        handled = list(module(mod).handled)
    assert sorted(handled, key=int) == [str(n) for n in range(10) if n != 3]
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        [(_, dead)] = r.xrange(f"{key_prefix}dlq")
    assert dead["n"] == "3" and dead["dlq_deliveries"] == "2"
    assert (
        dead["dlq_error"]
        == f"routes[0]: {mod}:{'handle_async' if 'async' in kind else 'handle'} raised {shown}"
    )
    assert f"{mod}:handle" in caplog.text and "the runner goes on" in caplog.text
