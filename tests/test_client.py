"""``cortex_flow.Client``: what a Python agent sends, beats and reads, on a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from cortex_flow import Client
from cortex_flow.errors import ConnectionFailed, CortexFlowError

FLOWS = """\
version: 1
streams:
  tasks: {key: "{P}tasks:{{ priority }}", priorities: [critical, high, normal, low]}
  inbox: {key: "{P}messages:{{ agent }}"}
  notes: {key: "{P}notes:{{ agent }}", codec: json}
  heartbeats: {key: "{P}heartbeats", maxlen: 100}
agents:
  harold: {heartbeat: {interval: 50ms}}
  worker: {}
heartbeats: {stream: heartbeats}
groups:
  harold:
    stream: inbox
    vars: {agent: harold}
    routes:
      - drop: true
"""


@pytest.fixture
def config(tmp_path: Path, redis_url: str, key_prefix: str) -> Path:
    """A project on the shared server whose keys all start with the test's prefix."""
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "main.yaml").write_text(FLOWS.replace("{P}", key_prefix))
    path = tmp_path / "config.yaml"
    path.write_text(f'redis: {{url: "{redis_url}"}}\n')
    return path


@pytest.fixture
async def harold(config: Path) -> AsyncIterator[Client]:
    """A client speaking as harold, connected from the config file."""
    async with Client.from_config(config, agent="harold") as client:
        yield client


async def test_send_task_lands_on_the_priority_key(
    harold: Client, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """send_task publishes to the priority's key; normal is the default."""
    high = await harold.send_task({"type": "batch", "job": 7}, priority="high")
    normal = await harold.send_task({"type": "chat"})
    assert await redis_client.xrange(f"{key_prefix}tasks:high") == [
        (high, {"type": "batch", "job": "7"})
    ]
    assert await redis_client.xrange(f"{key_prefix}tasks:normal") == [(normal, {"type": "chat"})]


async def test_send_to_and_publish_use_the_agent_key_and_codec(
    harold: Client, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """send_to writes the agent's inbox; publish encodes with the stream's codec."""
    entry = await harold.send_to("worker", {"text": "hi"})
    assert await redis_client.xrange(f"{key_prefix}messages:worker") == [(entry, {"text": "hi"})]
    note = await harold.publish("notes", {"n": 1}, agent="worker")
    assert await redis_client.xrange(f"{key_prefix}notes:worker") == [(note, {"data": '{"n":1}'})]


async def test_heartbeat_fields_and_beat_forever(
    harold: Client, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """heartbeat writes agent, kind, status and ts (ms); beat_forever repeats at the interval."""
    before = int(time.time() * 1000)
    await harold.heartbeat(status="busy")
    [(_, fields)] = await redis_client.xrange(f"{key_prefix}heartbeats")
    assert {k: fields[k] for k in ("agent", "kind", "status")} == {
        "agent": "harold",
        "kind": "agent",
        "status": "busy",
    }
    assert before <= int(fields["ts"]) <= int(time.time() * 1000)
    task = asyncio.create_task(harold.beat_forever())
    try:
        deadline = time.monotonic() + 5
        while await redis_client.xlen(f"{key_prefix}heartbeats") < 4:
            assert time.monotonic() < deadline, "beat_forever did not beat at its interval"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()


async def test_a_client_without_agent_cannot_beat_or_read(config: Path) -> None:
    """Heartbeats and inbox need an agent; an undeclared one is refused at once."""
    async with Client.from_config(config) as client:
        with pytest.raises(CortexFlowError, match="give the client an agent"):
            await client.heartbeat()
    with pytest.raises(CortexFlowError, match='agent "bob" is not declared'):
        Client.from_config(config, agent="bob")


async def test_inbox_reads_as_the_agent_and_acks(
    harold: Client, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """inbox reads as consumer harold of the declared group; handle() acknowledges."""
    key = f"{key_prefix}messages:harold"
    sent = await harold.send_to("harold", {"text": "hi"})
    messages = harold.inbox(block=0.1)
    message = await anext(messages)
    assert (message.id, message.msg, message.stream, message.deliveries) == (
        sent,
        {"text": "hi"},
        key,
        1,
    )
    assert message.group == "harold"
    [consumer] = await redis_client.xinfo_consumers(key, "harold")
    assert (consumer["name"], consumer["pending"]) == ("harold", 1)
    async with harold.handle(message):
        pass
    assert (await redis_client.xpending(key, "harold"))["pending"] == 0
    await messages.aclose()


async def test_inbox_rereads_own_pending_after_a_restart(
    config: Path, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A message read but not acknowledged comes back first, with its delivery count."""
    key = f"{key_prefix}messages:worker"
    async with Client.from_config(config, agent="worker") as first:
        assert first.inbox_group() == "worker"  # no declared group reads worker's inbox
        sent = await first.send_to("worker", {"text": "one"})
        messages = first.inbox(block=0.1)
        with pytest.raises(RuntimeError):
            async with first.handle(await anext(messages)):
                raise RuntimeError("agent crashed mid-message")
        await messages.aclose()
    later = await redis_client.xadd(key, {"text": "two"})
    async with Client.from_config(config, agent="worker") as second:
        messages = second.inbox(block=0.1)
        again = await anext(messages)
        assert (again.id, again.deliveries, again.msg) == (sent, 2, {"text": "one"})
        await again.ack()
        fresh = await anext(messages)
        assert (fresh.id, fresh.deliveries) == (later, 1)
        await fresh.ack()
        await messages.aclose()
    assert (await redis_client.xpending(key, "worker"))["pending"] == 0


def test_from_config_needs_a_running_embedded_server(tmp_path: Path) -> None:
    """With redis.url embedded and no runner, from_config says how to fix it."""
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "main.yaml").write_text("version: 1\n")
    (tmp_path / "config.yaml").write_text("redis: {url: embedded}\n")
    with pytest.raises(ConnectionFailed, match="cortex-flow run"):
        Client.from_config(tmp_path / "config.yaml")


async def test_a_publish_that_must_reach_a_replica_says_when_it_did_not(
    tmp_path: Path,
) -> None:
    """``replicas=1``: with no replica the publish (made) raises NotReplicated naming the
    entry, to publish it again; once a replica follows, the same publish returns its ID."""
    from projects import wait_for
    from redis_servers import PrivateRedis

    from cortex_flow.errors import NotReplicated
    from cortex_flow.flow.loader import load_project

    master = PrivateRedis(tmp_path / "master", args=("--repl-diskless-sync-delay", "0")).start()
    replica = PrivateRedis(tmp_path / "replica")
    client = aioredis.Redis(port=master.port, decode_responses=True)
    try:
        (tmp_path / "flows").mkdir()
        (tmp_path / "flows" / "main.yaml").write_text(FLOWS.replace("{P}", "t:"))
        (tmp_path / "config.yaml").write_text(f'redis: {{url: "{master.url}"}}\n')
        sender = Client(load_project(tmp_path / "config.yaml"), client, replicas=1)
        with pytest.raises(NotReplicated, match=r"on t:tasks:high reached 0 of 1 replica"):
            await sender.send_task({"n": "1"}, priority="high")
        assert await client.xlen("t:tasks:high") == 1  # made, not yet safe
        replica.args = ("--replicaof", "127.0.0.1", str(master.port))
        replica.start()

        follower = aioredis.Redis(port=replica.port, decode_responses=True)

        async def synced() -> bool:
            return (await follower.info("replication")).get("master_link_status") == "up"

        await wait_for(synced, timeout=15, what="the replica in sync")
        await follower.aclose()
        entry = await sender.send_task({"n": "2"}, priority="high")
        assert (await client.xrange("t:tasks:high"))[-1] == (entry, {"n": "2"})
    finally:
        await client.aclose()
        replica.stop()
        master.stop()
