"""Failovers under load: Redis Cluster (three masters, a replica each) and Sentinel.

Two runners share one group over a partitioned stream while a producer publishes
20,000 messages; mid-run a replica takes over (manual failover), or a master is
SIGKILLed. Every message is counted by its number: lost, handled twice, left pending.
The figures are printed (``pytest -s``) and kept in docs/operating.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from projects import make_project, running, wait_for, wait_for_sync
from redis.asyncio.cluster import RedisCluster
from redis_servers import PrivateCluster, PrivateRedis, PrivateSentinel

from cortex_flow import Client
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import resolve
from cortex_flow.ops.status import collect
from cortex_flow.wire.connection import redis_from_url

MESSAGES = 20_000
PARTITIONS = 6

FLOWS = f"""
    version: 1
    streams:
      jobs:
        key: "fo:jobs:{{{{ partition }}}}"
        partitions: {PARTITIONS}
        partition_key: "{{{{ msg.n }}}}"
      done:
        key: "fo:done:{{{{ partition }}}}"
        partitions: {PARTITIONS}
        partition_key: "{{{{ msg.n }}}}"
      beats: {{key: "fo:beats"}}
    heartbeats: {{stream: beats}}               # the runners split the partitions by these
    groups:
      work:
        stream: jobs
        retry: {{claim_idle: 5s}}
        routes:
          - to: done
"""

JOBS = [f"fo:jobs:{{p{i}}}" for i in range(PARTITIONS)]
DONE = [f"fo:done:{{p{i}}}" for i in range(PARTITIONS)]


async def _produce(client: Client, published: set[int], halfway: asyncio.Event) -> None:
    """Publish every number, 100 at a time; a refused publish is tried again (alone)."""
    chunk = 100
    for start in range(0, MESSAGES, chunk):
        todo = list(range(start, min(start + chunk, MESSAGES)))
        deadline = time.monotonic() + 60
        while todo:
            sent = await asyncio.gather(
                *(client.publish("jobs", {"n": str(n)}) for n in todo), return_exceptions=True
            )
            failed = [n for n, got in zip(todo, sent, strict=True) if isinstance(got, Exception)]
            published.update(set(todo) - set(failed))
            todo = failed
            if todo:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"publishing {len(todo)} messages failed for 60s")
                await asyncio.sleep(0.05)
        if start >= MESSAGES // 2:
            halfway.set()


async def _numbers(client: Any, keys: list[str]) -> Counter[int]:
    counted: Counter[int] = Counter()
    for key in keys:
        for _, fields in await client.xrange(key):
            counted[int(fields["n"])] += 1
    return counted


async def _pending(client: Any) -> int:
    return sum([int((await client.xpending(k, "work"))["pending"]) for k in JOBS])


async def _run(
    tmp_path: Path,
    url: str,
    client: Any,
    event: Callable[[], Awaitable[None]],
    what: str,
    caplog: pytest.LogCaptureFixture,
    replicas: int = 0,
) -> dict[str, int]:
    """Two runners, a producer, ``event`` halfway; returns the counts by message number.

    ``replicas``: the producer waits for that many replicas per publish (and publishes
    again when they did not get it), as a producer that must not lose a message does.
    """
    caplog.set_level(logging.INFO)
    first = make_project(tmp_path, FLOWS, url=url, name="r1")
    second = make_project(tmp_path, FLOWS, url=url, name="r2", config_name="second.yaml")
    producer = Client(load_project(first), client, replicas=replicas)
    published: set[int] = set()
    halfway = asyncio.Event()
    began = time.monotonic()
    async with running(first) as one, running(second) as two:
        producing = asyncio.create_task(_produce(producer, published, halfway))
        await asyncio.wait_for(halfway.wait(), 120)
        await event()
        await asyncio.wait_for(producing, 180)

        async def settled() -> bool:
            try:
                jobs, done = await _numbers(client, JOBS), await _numbers(client, DONE)
                return await _pending(client) == 0 and set(jobs) <= set(done)
            except (redis.RedisError, OSError):
                return False

        await wait_for(settled, timeout=120, what="every surviving message handled")
        # the two runners share the partitions, each read by one of them
        owned = [one.consumers["work"].owned(), two.consumers["work"].owned()]  # type: ignore[union-attr]
        assert all(owned) and sorted(owned[0] + owned[1]) == list(range(PARTITIONS)), owned
    seconds = time.monotonic() - began
    jobs, done = await _numbers(client, JOBS), await _numbers(client, DONE)
    figures = {
        "published": len(published),
        "handled": len(done),
        "lost": len(published - set(done)),
        "lost_by_redis": len(published - set(jobs) - set(done)),
        # handled more often than published (a producer's retry is not the runners')
        "duplicated": sum(max(0, c - max(1, jobs[n])) for n, c in done.items()),
        "published_twice": sum(c - 1 for c in jobs.values() if c > 1),
        "pending": await _pending(client),
        "seconds": round(seconds),
    }
    said = Counter(r.getMessage()[:60] for r in caplog.records if r.levelno >= logging.WARNING)
    print(f"\nFAILOVER {what}: {figures}; warnings: {dict(said)}")
    tracebacks = [r for r in caplog.records if r.name.startswith("cortex_flow") and r.exc_info]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
    return figures


# -- Redis Cluster ------------------------------------------------------------------------


async def _cluster_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kill: bool
) -> tuple[dict[str, int], PrivateCluster]:
    cluster = PrivateCluster(tmp_path / "cluster", replicas=1).start()
    client = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, decode_responses=True)
    master = cluster.nodes[1]  # followed by node 4
    replica = cluster.nodes[1 + cluster.masters]

    async def promoted() -> bool:
        return await asyncio.to_thread(lambda: cluster.roles().get(replica.port) == "master")

    async def failover() -> None:
        if kill:
            master.kill()
        else:
            with redis.Redis(port=replica.port) as r:
                r.execute_command("CLUSTER", "FAILOVER")
        await wait_for(promoted, timeout=30, what="the replica promoted")

    try:
        what = "cluster, master SIGKILLed" if kill else "cluster, CLUSTER FAILOVER"
        figures = await _run(tmp_path, cluster.url, client, failover, what, caplog)
        # one partitioned group's work went to every master: each holds some partitions
        owners = {getattr(client.get_node_from_key(key), "port", None) for key in JOBS}
        assert len(owners) == cluster.masters
        return figures, cluster
    finally:
        await client.aclose()
        cluster.stop()


async def test_cluster_manual_failover_under_load_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CLUSTER FAILOVER on a replica mid-run: the runners follow the slots to the new
    master; nothing is lost, nothing is left pending."""
    figures, _ = await _cluster_run(tmp_path, caplog, kill=False)
    assert figures["lost"] == 0 and figures["pending"] == 0
    assert figures["handled"] == MESSAGES


async def test_cluster_sigkilled_master_under_load_leaves_nothing_pending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A master SIGKILLed mid-run: its replica takes over after the node timeout; the
    runners reconnect and finish every message the cluster kept (a write the dead master
    acknowledged but had not replicated is gone from Redis itself), none left pending."""
    figures, _ = await _cluster_run(tmp_path, caplog, kill=True)
    assert figures["pending"] == 0
    assert figures["lost"] == figures["lost_by_redis"]  # every surviving message handled


# -- Sentinel -----------------------------------------------------------------------------


async def _sentinel_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kill: bool
) -> dict[str, int]:
    master = PrivateRedis(tmp_path / "master", args=("--repl-diskless-sync-delay", "0")).start()
    replica = PrivateRedis(
        tmp_path / "replica", args=("--replicaof", "127.0.0.1", str(master.port))
    ).start()
    with redis.Redis(port=replica.port, decode_responses=True) as r:
        # in sync before the run: a replica promoted before its first sync has nothing
        wait_for_sync(lambda: r.info("replication").get("master_link_status") == "up", 30)
    sentinel = PrivateSentinel(tmp_path / "sentinel", master).start()
    url = sentinel.url
    client: Any = redis_from_url(url)
    sentinels: Any = aioredis.Redis(port=sentinel.node.port, decode_responses=True)

    async def replica_known() -> bool:
        found = await sentinels.execute_command("SENTINEL", "REPLICAS", sentinel.service)
        return any("s_down" not in str(r) and str(replica.port) in str(r) for r in found)

    async def promoted() -> bool:
        got = await sentinels.execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", sentinel.service
        )
        return int(got[1]) == replica.port

    async def failover() -> None:
        if kill:
            master.kill()
        else:
            await sentinels.execute_command("SENTINEL", "FAILOVER", sentinel.service)
        await wait_for(promoted, timeout=60, what="the replica promoted")
        if kill:  # back as the new master's replica (the sentinel makes it one)
            await asyncio.to_thread(master.start)

    try:
        await wait_for(replica_known, timeout=30, what="the sentinel knows the replica")
        what = "sentinel, master SIGKILLed" if kill else "sentinel, SENTINEL FAILOVER"
        figures = await _run(tmp_path, url, client, failover, what, caplog, replicas=1)
        # lag from entry IDs: the promoted replica's counters must not raise an alarm
        resolved = resolve(load_project(tmp_path / "config.yaml").topology, "r1")
        groups = (await collect(client, resolved))["groups"]
        assert {g["key"]: g["lag"] for g in groups} == dict.fromkeys(JOBS, 0)
        return figures
    finally:
        await client.aclose()
        await sentinels.aclose()
        sentinel.stop()
        replica.stop()
        master.stop()


async def test_sentinel_failover_under_load_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SENTINEL FAILOVER mid-run: the runners find the new master through the sentinel;
    nothing is lost or left pending, and status shows lag 0 afterwards. (Sentinel's
    failover is not coordinated: the producer waits for its replica, see Client.replicas.)"""
    figures = await _sentinel_run(tmp_path, caplog, kill=False)
    assert figures["lost"] == 0 and figures["pending"] == 0
    assert figures["handled"] == MESSAGES


async def test_sentinel_sigkilled_master_under_load_leaves_nothing_pending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The master SIGKILLed mid-run: the sentinel promotes the replica, the runners go on;
    with the producer waiting for its replica nothing is lost, none is left pending."""
    figures = await _sentinel_run(tmp_path, caplog, kill=True)
    assert figures["lost"] == 0 and figures["pending"] == 0
