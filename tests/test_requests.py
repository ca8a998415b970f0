"""Request/reply between agents, against the real runner and server (issue 14, item 1, 3, 7)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from projects import NewProject, module, none_pending, running

from cortex_flow import Client, RequestFailed, RequestTimeout
from cortex_flow.errors import CortexFlowError

FLOWS = """
version: 1
streams:
  ask: {key: "{P}ask"}
  jask: {key: "{P}jask", codec: json}
  chain: {key: "{P}chain"}
  nobody: {key: "{P}nobody"}
  dlq: {key: "{P}dlq"}
groups:
  ask:
    stream: ask
    dead_letter: dlq
    retry: {max_deliveries: 2, backoff: {initial: 10ms}}
    routes:
      - when: "msg.op == 'fail'"
        call: {M}:fail
      - when: "msg.op == 'big'"
        call: {M}:big
      - when: "msg.op == 'forward'"
        to: chain
      - when: "msg.op == 'sync'"
        call: {M}:sync_double
      - call: {M}:double
  jask:
    stream: jask
    routes:
      - call: {function: "{M}:inline_echo", inline: true}
  chain:
    stream: chain
    routes:
      - call: {M}:double
"""

HANDLERS = """
seen = []

async def double(msg):
    seen.append(dict(msg))
    return {"n": int(msg["n"]) * 2}

def sync_double(msg):
    return {"n": int(msg["n"]) * 2, "sync": True}

def inline_echo(msg):
    return msg

async def fail(msg):
    raise ValueError("no good")

async def big(msg):
    return "x" * 2_000_000
"""


@pytest.fixture
def config(new_project: NewProject) -> tuple[Path, str]:
    return new_project(FLOWS, HANDLERS)


async def test_request_returns_the_handlers_reply(config: tuple[Path, str]) -> None:
    """An async, a sync and an inline call each answer with what they returned; the
    handler sees the message without the request's fields."""
    path, mod = config
    async with running(path), Client.from_config(path) as client:
        assert await client.request("ask", {"n": "21"}, timeout=10) == {"n": 42}
        assert await client.request("ask", {"n": "2", "op": "sync"}, timeout=10) == {
            "n": 4,
            "sync": True,
        }
        assert await client.request("jask", {"a": [1, 2]}, timeout=10) == {"a": [1, 2]}
        assert module(mod).seen == [{"n": "21"}]


async def test_a_to_route_carries_the_reply_address(
    config: tuple[Path, str], key_prefix: str
) -> None:
    """The agent at the end of a chain answers the original requester."""
    path, _mod = config
    async with running(path), Client.from_config(path) as client:
        assert await client.request("ask", {"n": "5", "op": "forward"}, timeout=10) == {"n": 10}
        (entry_id,) = list(client._asked)
        task = await client.task(entry_id)  # the chain's end settled the first entry's task
        assert (task.state, task.stream, task.id) == ("completed", f"{key_prefix}ask", entry_id)


async def test_dead_lettered_request_raises_request_failed(
    config: tuple[Path, str], redis_client: Any, key_prefix: str
) -> None:
    """A request whose handler fails for good raises RequestFailed with the dead-letter
    reason; a reply too large for max_reply_bytes fails the message with that reason."""
    path, _ = config
    async with running(path), Client.from_config(path) as client:
        with pytest.raises(RequestFailed, match="no good") as failed:
            await client.request("ask", {"op": "fail"}, timeout=10)
        assert "ValueError: no good" in failed.value.reason
        with pytest.raises(RequestFailed, match="too large"):
            await client.request("ask", {"op": "big"}, timeout=10)
        dead = [f["dlq_error"] for _, f in await redis_client.xrange(f"{key_prefix}dlq")]
        assert dead[0] == "routes[0]: ValueError: no good"
        assert dead[1].startswith("the reply is too large: 2000002 bytes")


async def test_bad_input_is_refused_at_once(config: tuple[Path, str]) -> None:
    """No group reads the stream, or an invalid timeout or ttl: a clear error, no wait."""
    path, _ = config
    async with Client.from_config(path) as client:
        refused = "no group reads .*nobody.*streams a group reads: ask, chain, jask"
        with pytest.raises(CortexFlowError, match=refused):
            await client.request("nobody", {"n": 1})
        with pytest.raises(CortexFlowError, match="timeout must be more than 0"):
            await client.request("ask", {"n": 1}, timeout=0)
        with pytest.raises(CortexFlowError, match="ttl must be a duration"):
            await client.request("ask", {"n": 1}, ttl="soon")
        with pytest.raises(CortexFlowError, match="ttl must be more than 0"):
            await client.publish("ask", {"n": 1}, ttl=-1)


async def test_no_runner_means_request_timeout(config: tuple[Path, str]) -> None:
    """With nobody answering, RequestTimeout (a TimeoutError) after the timeout."""
    path, _ = config
    async with Client.from_config(path) as client:
        with pytest.raises(TimeoutError):
            await client.request("ask", {"n": 1}, timeout=0.3)
        with pytest.raises(RequestTimeout, match="no reply to request"):
            await client.request("ask", {"n": 1}, timeout=0.3)


AGENT_FLOWS = """
version: 1
streams:
  inbox: {key: "{P}inbox:{{ agent }}"}
agents:
  worker: {}
groups:
  worker:
    stream: inbox
    vars: {agent: worker}
    routes:
      - drop: true
"""


async def test_an_agent_reading_its_inbox_answers_with_message_reply(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """An agent's own loop answers a request: reply and acknowledgement in one step."""
    path, _ = new_project(AGENT_FLOWS)
    async with Client.from_config(path) as asker, Client.from_config(path, agent="worker") as me:

        async def agent() -> None:
            async for message in me.inbox(block=0.1):
                assert message.is_request and message.msg == {"q": "2+2"}
                await message.reply({"a": 4})
                return

        serving = asyncio.create_task(agent())
        assert await asker.request("inbox", {"q": "2+2"}, agent="worker", timeout=10) == {"a": 4}
        await serving
        assert await none_pending(redis_client, f"{key_prefix}inbox:worker", "worker")
        (entry_id,) = list(asker._asked)
        assert (await asker.task(entry_id)).state == "completed"
