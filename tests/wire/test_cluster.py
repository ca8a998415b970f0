"""Redis Cluster: one runner code path; atomic where keys share a slot, else publish-then-ack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from projects import make_project, module, running, wait_for, write_module
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis_servers import PrivateCluster

from cortex_flow import Client, RequestFailed

HANDLER = """
    seen = []
    def handle(msg):
        seen.append(msg["n"])
"""

FLOWS = """
version: 1
streams:
  tasks:
    key: "{P}tasks:{{{{ priority }}}}"
    priorities: [critical, high, normal, low]
  inbox: {{key: "{P}inbox:{{{{ agent }}}}"}}
  dlq: {{key: "{P}dlq"}}
agents:
  bob: {{}}
groups:
  agents:
    stream: tasks
    dead_letter: dlq
    routes:
      - when: "msg.to in agents"
        to: inbox
        vars: {{agent: "{{{{ msg.to }}}}"}}
      - call: {{function: "{{M}}:handle", inline: true}}
  bob:
    stream: inbox
    vars: {{agent: bob}}
    routes:
      - call: {{function: "{{M}}:handle", inline: true}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    nodes = PrivateCluster(tmp_path_factory.mktemp("cluster")).start()
    yield nodes
    nodes.stop()


async def _run(cluster: PrivateCluster, tmp_path: Path, prefix: str) -> None:
    mod = write_module(tmp_path, HANDLER)
    flows = FLOWS.format(P=prefix).replace("{M}", mod)
    config = make_project(tmp_path, flows, url=cluster.url, mod=mod)
    client = RedisCluster.from_url(
        cluster.url.replace("redis+cluster", "redis"), decode_responses=True
    )
    try:
        async with running(config) as runner:
            assert runner.cluster
            for n in range(60):
                level = ("critical", "high", "normal", "low")[n % 4]
                fields = {"n": str(n)} | ({"to": "bob"} if n % 3 == 0 else {})
                await client.xadd(f"{prefix}tasks:{level}", fields)
            seen = module(mod).seen
            await wait_for(lambda: len(seen) >= 60, 20, "60 messages handled")
            assert sorted(map(int, seen)) == list(range(60))
            for key in [f"{prefix}tasks:{p}" for p in ("critical", "high", "normal", "low")]:
                assert (await client.xpending(key, "agents"))["pending"] == 0
            assert (await client.xpending(f"{prefix}inbox:bob", "bob"))["pending"] == 0
            assert await client.xlen(f"{prefix}inbox:bob") == 20
    finally:
        await client.aclose()


async def test_hash_tagged_keys_share_a_slot_and_route(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    """With {tag} keys every key shares one slot: priority fetch and publish+ack stay atomic."""
    prefix = "{cf}:"
    assert key_slot(f"{prefix}tasks:high".encode()) == key_slot(f"{prefix}inbox:bob".encode())
    await _run(cluster, tmp_path, prefix)


async def test_keys_in_different_slots_publish_then_ack(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    """Without a hash tag the keys spread over slots; routing still delivers everything once."""
    prefix = "cf:"
    slots = {key_slot(f"{prefix}tasks:{p}".encode()) for p in ("critical", "high", "normal", "low")}
    assert len(slots) > 1
    await _run(cluster, tmp_path, prefix)


ASK_FLOWS = """
version: 1
streams:
  ask: {{key: "{P}ask"}}
  dlq: {{key: "{P}dlq"}}
groups:
  ask:
    stream: ask
    dead_letter: dlq
    retry: {{max_deliveries: 1}}
    track: true
    routes:
      - call: {{M}}:answer
"""

ANSWER = """
    async def answer(msg):
        if msg.get("fail"):
            raise ValueError("no")
        return {"n": int(msg["n"]) + 1}
"""


@pytest.mark.parametrize("prefix", ["{cf}:", "cf:"])
async def test_requests_in_a_cluster(cluster: PrivateCluster, tmp_path: Path, prefix: str) -> None:
    """Request/reply, failures and task states work with the reply stream in the request's
    slot (atomic script) and in another (written before the acknowledgement)."""
    mod = write_module(tmp_path, ANSWER)
    config = make_project(
        tmp_path, ASK_FLOWS.format(P=prefix).replace("{M}", mod), url=cluster.url, mod=mod
    )
    async with running(config), Client.from_config(config) as client:
        answers = [await client.request("ask", {"n": str(n)}, timeout=20) for n in range(5)]
        assert answers == [{"n": n + 1} for n in range(5)]
        with pytest.raises(RequestFailed, match="ValueError: no"):
            await client.request("ask", {"fail": "1"}, timeout=20)
        states = [(await client.task(i)).state for i in client._asked]
        assert states == ["completed"] * 5 + ["failed"]
