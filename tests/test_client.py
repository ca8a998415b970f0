"""``cortex_flow.Client``: what a Python agent sends, beats and reads, on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from cortex_flow import Client
from cortex_flow.client import Message
from cortex_flow.errors import ConnectionFailed, CortexFlowError
from cortex_flow.flow.topology import resolve
from cortex_flow.ops.dlq import Filters, list_entries
from cortex_flow.ops.drift import drift
from cortex_flow.ops.status import collect

FLOWS = """\
version: 1
streams:
  tasks: {key: "{P}tasks:{{ priority }}", priorities: [critical, high, normal, low]}
  inbox: {key: "{P}messages:{{ agent }}"}
  notes: {key: "{P}notes:{{ agent }}", codec: json}
  heartbeats: {key: "{P}heartbeats", maxlen: 100}
  dlq: {key: "{P}dlq"}
agents:
  harold: {heartbeat: {interval: 50ms}}
  worker:
    inbox:
      retry: {max_deliveries: 3, backoff: {initial: 20ms, max: 40ms}, claim_idle: 300ms}
      dead_letter: dlq
  scout: {}
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
        assert first.inbox_group() == "worker"  # agents.worker.inbox: the group is "worker"
        sent = await first.send_to("worker", {"text": "one"})
        messages = first.inbox(block=0.1)
        assert (await anext(messages)).id == sent  # then the agent crashes mid-message
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


async def _handle_until(
    client: Client, done: Callable[[], Awaitable[bool]], fail: Callable[[Message], bool]
) -> list[Message]:
    """Read the client's inbox, raising in ``handle`` where ``fail(message)``, until
    ``done()``; the messages handed over, in order."""
    seen: list[Message] = []

    async def agent() -> None:
        async for message in client.inbox(block=0.05):
            seen.append(message)
            async with client.handle(message):
                if fail(message):
                    raise ValueError(f"bad task {message.msg.get('n')}")

    task = asyncio.create_task(agent())
    deadline = time.monotonic() + 10
    try:
        while not await done():
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, f"inbox did not get there; saw {seen}"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return seen


async def test_a_failing_handle_is_retried_with_backoff_then_dead_lettered(
    config: Path, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """handle() raising: retried after its backoff, dead-lettered after max_deliveries
    with the runtime's dlq_* fields and the error; the good message is acknowledged."""
    key, dlq = f"{key_prefix}messages:worker", f"{key_prefix}dlq"
    async with Client.from_config(config, agent="worker") as worker:
        bad = await worker.send_to("worker", {"n": "1"})
        good = await worker.send_to("worker", {"n": "2"})

        async def dead_lettered() -> bool:
            return bool(await redis_client.xlen(dlq))

        seen = await _handle_until(worker, dead_lettered, lambda m: m.id == bad)
    assert [(m.id, m.deliveries) for m in seen] == [(bad, 1), (good, 1), (bad, 2), (bad, 3)]
    [(_, fields)] = await redis_client.xrange(dlq)
    at = fields.pop("dlq_at")
    assert fields == {
        "n": "1",
        "dlq_stream": key,
        "dlq_id": bad,
        "dlq_group": "worker",
        "dlq_deliveries": "3",
        "dlq_error": "ValueError: bad task 1",
    }
    assert at.endswith("+00:00")
    assert (await redis_client.xpending(key, "worker"))["pending"] == 0
    [entry] = await list_entries(redis_client, [dlq], Filters())
    assert (entry.group, entry.error, entry.source_id) == ("worker", "ValueError: bad task 1", bad)


async def test_an_idle_message_of_a_dead_consumer_is_claimed(
    config: Path, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """An entry another consumer took and never acknowledged is claimed after claim_idle;
    one claimed past max_deliveries is dead-lettered without being handed over."""
    key, dlq = f"{key_prefix}messages:worker", f"{key_prefix}dlq"
    async with Client.from_config(config, agent="worker") as worker:
        assert worker.inbox_group() == "worker"
        await redis_client.xgroup_create(key, "worker", id="0", mkstream=True)
        lost = await redis_client.xadd(key, {"n": "1"})
        worn = await redis_client.xadd(key, {"n": "2"})
        await redis_client.xreadgroup("worker", "crashed", {key: ">"})
        for _ in range(3):  # worn out: delivered max_deliveries times already
            await redis_client.xclaim(key, "worker", "crashed", 0, [worn])

        async def both_done() -> bool:
            return (await redis_client.xpending(key, "worker"))["pending"] == 0

        seen = await _handle_until(worker, both_done, lambda m: False)
    assert [(m.id, m.deliveries) for m in seen] == [(lost, 2)]
    [(_, fields)] = await redis_client.xrange(dlq)
    assert (fields["dlq_id"], fields["dlq_deliveries"]) == (worn, "4")
    assert fields["dlq_error"].startswith("delivered 4 times without being acknowledged")


async def test_the_client_reads_only_groups_the_flows_declare(
    config: Path, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """An agent whose inbox no group reads is told how to declare one; a declared inbox
    group, once read, is what status shows and plan finds no drift in."""
    async with Client.from_config(config, agent="scout") as scout:
        with pytest.raises(
            CortexFlowError,
            match=r"agent scout: no declared group reads its "
            r"inbox .*messages:scout; .*agents: \{scout: \{inbox: ",
        ):
            await anext(scout.inbox())
    async with Client.from_config(config, agent="worker") as worker:
        await worker.send_to("worker", {"n": "1"})
        messages = worker.inbox(block=0.05)
        async with worker.handle(await anext(messages)):
            pass
        await messages.aclose()
        resolved = resolve(worker.project.topology, "runner-1")
        changes = await drift(redis_client, resolved)
        assert [c for c in changes if c.name == "worker" or "worker" in c.detail] == []
        status = await collect(redis_client, resolved)
    [row] = [g for g in status["groups"] if g["name"] == "worker"]
    assert (row["key"], row["status"], row["pending"]) == (f"{key_prefix}messages:worker", "ok", 0)
    assert [c["name"] for c in row["consumers"]] == ["worker"]


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
