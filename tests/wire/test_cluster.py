"""Redis Cluster: one runner code path; atomic where keys share a slot, else publish-then-ack."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from projects import make_project, module, running, wait_for, write_module
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis_servers import PrivateCluster

from cortex_flow.wire.duties import Fence, LeaseLost, holder_of
from cortex_flow.wire.retention import trim

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
    client = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, decode_responses=True)
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
    cluster: PrivateCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a hash tag the keys spread over slots; routing still delivers everything once,
    and the runner says once, at start, that the group polls and how to fix it."""
    prefix = "cf:"
    slots = {key_slot(f"{prefix}tasks:{p}".encode()) for p in ("critical", "high", "normal", "low")}
    assert len(slots) > 1
    caplog.set_level(logging.INFO)
    await _run(cluster, tmp_path, prefix)
    said = [r.getMessage() for r in caplog.records if "different cluster slots" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("group agents: its 4 keys (cf:tasks:critical, cf:tasks:high, ")
    assert "it polls them every" in said[0] and '"{tasks}:..."' in said[0]


RETAINED = """
version: 1
streams:
  tasks:
    key: "{P}tasks:{{{{ priority }}}}"
    priorities: [high, low]
    retention: {{max_len: 10}}
groups:
  agents:
    stream: tasks
    routes:
      - call: {{function: "{{M}}:handle", inline: true}}
"""


async def test_retention_and_fenced_duties_across_slots(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    """In a cluster the lease and the trimmed keys live in different slots: the fence is
    checked just before each act, a stale one still cannot act, and every key is trimmed
    to its cap once its entries are handled."""
    prefix = "cfr:"
    mod = write_module(tmp_path, HANDLER)
    flows = RETAINED.format(P=prefix).replace("{M}", mod)
    config = make_project(
        tmp_path, flows, url=cluster.url, mod=mod, runner_extra=", retention_interval: 100ms"
    )
    client = RedisCluster.from_url(
        f"redis://127.0.0.1:{cluster.nodes[0].port}", decode_responses=True
    )
    keys = [f"{prefix}tasks:high", f"{prefix}tasks:low"]
    try:
        async with running(config) as runner:
            lease = runner.resolved.duty_key("retention")  # type: ignore[union-attr]
            assert key_slot(lease.encode()) not in {key_slot(k.encode()) for k in keys}
            for n in range(60):
                await client.xadd(keys[n % 2], {"n": str(n)})
            seen = module(mod).seen
            await wait_for(lambda: len(seen) >= 60, 20, "60 messages handled")

            async def capped() -> bool:
                return [await client.xlen(k) for k in keys] == [10, 10]

            await wait_for(capped, 20, "every key trimmed to its cap")
            holder = await holder_of(client, lease)
            assert holder is not None
            stale = Fence(lease, holder[0] - 1, holder[1])
            with pytest.raises(LeaseLost):
                await trim(client, stale, keys[0], max_len=1, max_age=None)
            assert await client.xlen(keys[0]) == 10
    finally:
        for key in keys:
            await client.delete(key)
        await client.aclose()
