"""A failover's replies are expected events: one log line each, never a traceback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from projects import make_project, running, wait_for
from redis._parsers.base import BaseParser
from redis.exceptions import ClusterError, SlotNotCoveredError
from redis_servers import PrivateRedis

from cortex_flow.wire.faults import error_text, passing_reason


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("UNBLOCKED force unblock from blocking operation, instance state changed", "failover"),
        ("READONLY You can't write against a read only replica.", "readonly"),
        ("MOVED 3999 127.0.0.1:6381", "failover"),
        ("ASK 3999 127.0.0.1:6381", "failover"),
        ("TRYAGAIN Multiple keys request during rehashing of slot", "failover"),
        ("CLUSTERDOWN The cluster is down", "failover"),
        ("MASTERDOWN Link with MASTER is down", "failover"),
        ("LOADING Redis is loading the dataset in memory", "loading"),
        ("OOM command not allowed when used memory > 'maxmemory'.", "oom"),
        ("ERR unknown command", None),
        ("NOGROUP No such key", None),
    ],
)
def test_a_failover_reply_is_a_passing_state_as_redis_py_parses_it(
    reply: str, reason: str | None
) -> None:
    """redis-py strips the code from the message (``status_code`` keeps it): the reply
    is still recognised, and logged with its code."""
    error = BaseParser.parse_error(reply)  # type: ignore[no-untyped-call]
    assert passing_reason(error) == reason
    assert passing_reason(reply) == reason  # as a script's pcall reports it
    assert error_text(error) == reply


def test_the_cluster_clients_own_errors_are_a_failover() -> None:
    """The cluster client giving up (redirections exhausted, no owner for a slot) is a
    failover too, not an unexpected error."""
    assert passing_reason(ClusterError("TTL exhausted.")) == "failover"
    assert passing_reason(SlotNotCoveredError("Slot 3999 is not covered")) == "failover"


FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      done: {key: "{P}done"}
    groups:
      workers:
        stream: jobs
        routes:
          - to: done
"""


async def test_an_unblocked_read_is_one_line_and_the_group_goes_on(
    private_redis: PrivateRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``UNBLOCKED`` ending a group's blocking read (as a failover does; here CLIENT UNBLOCK
    ... ERROR) logs one warning naming it, no traceback, and the group reads on."""
    config = make_project(tmp_path, FLOW, url=private_redis.url, prefix="t:")
    client: Any = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    caplog.set_level(logging.INFO)
    try:
        async with running(config):

            async def blocked() -> list[int]:
                found = await client.client_list()
                return [int(c["id"]) for c in found if c.get("cmd") == "xreadgroup"]

            ids = await wait_for(blocked, timeout=15, what="a blocking read")
            for client_id in ids:
                await client.execute_command("CLIENT", "UNBLOCK", client_id, "ERROR")
            await client.xadd("t:jobs", {"n": "1"})

            async def delivered() -> bool:
                return int(await client.xlen("t:done")) == 1

            await wait_for(delivered, timeout=15)
    finally:
        await client.aclose()
    said = [r for r in caplog.records if "UNBLOCKED" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "master is down or moving" in said[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or "unexpected" in r.getMessage()]
