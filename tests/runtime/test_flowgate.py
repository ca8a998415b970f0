"""The flow-control gate in one runner: waits keep leases, a copy waits for its first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from projects import make_project, running, wait_for

from cortex_flow.client import Client
from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import namespace
from cortex_flow.wire.flowcontrol import group_key

FAST = ", duty_lease: 1s, heartbeat_interval: 500ms"

RATE_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      done: {key: "{P}done"}
    groups:
      work:
        stream: tasks
        rate_limit: {rate: 5/s, burst: 1, key: "{{ msg.tenant }}"}
        retry: {claim_idle: 1s, backoff: {initial: 500ms}}
        routes:
          - to: done
            set: {n: "{{ msg.n }}", d: "{{ deliveries }}", tenant: "{{ msg.tenant }}"}
"""


async def _length(client: Any, key: str, n: int) -> bool:
    return int(await client.xlen(key)) >= n


async def test_messages_waiting_for_tokens_keep_their_leases(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """Twenty messages of two tenants at 5/s each wait up to 2 s, past claim_idle (1 s):
    each is handled once, on its first delivery, and the wait shows in the stats."""
    config = make_project(tmp_path, RATE_FLOW, url=redis_url, prefix=key_prefix, runner_extra=FAST)
    for n in range(20):
        await redis_client.xadd(f"{key_prefix}tasks", {"n": str(n), "tenant": f"t{n % 2}"})
    async with running(config) as runner:
        await wait_for(lambda: _length(redis_client, f"{key_prefix}done", 20), timeout=20)
        flow = runner.stats.groups["work"].flow
        assert flow is not None and flow.rate_waits > 0 and flow.waiting == 0
    rows = [f for _, f in await redis_client.xrange(f"{key_prefix}done")]
    assert sorted(int(f["n"]) for f in rows) == list(range(20))
    assert {f["d"] for f in rows} == {"1"}


DEDUP_FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      done: {key: "{P}done"}
    groups:
      work:
        stream: tasks
        dedup: {key: "{{ msg.k }}", window: 1m}
        retry: {claim_idle: 1s, backoff: {initial: 500ms}}
        routes:
          - to: done
"""


async def test_a_copy_of_a_message_held_by_a_dead_consumer_waits_then_is_acked_unhandled(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """The first copy was seen (marked) by a consumer that died holding it; a second copy
    waits without blocking the runner, which claims the first after claim_idle, handles
    it once, and then acknowledges the copy unhandled (counted as a duplicate). Messages
    whose key renders empty are all handled."""
    config = make_project(tmp_path, DEDUP_FLOW, url=redis_url, prefix=key_prefix, runner_extra=FAST)
    tasks = f"{key_prefix}tasks"
    await redis_client.xgroup_create(tasks, "work", id="0", mkstream=True)
    first = await redis_client.xadd(tasks, {"k": "a", "copy": "1"})
    await redis_client.xreadgroup("work", "ghost", {tasks: ">"})
    ns = namespace(load_project(config).topology)
    await redis_client.set(group_key(ns, "work", "dedup:a"), f"{tasks} {first}")
    await redis_client.xadd(tasks, {"k": "a", "copy": "2"})
    await redis_client.xadd(tasks, {"k": "b", "copy": "1"})
    for _ in range(2):  # no key: never a duplicate
        await redis_client.xadd(tasks, {"copy": "keyless"})
    async with running(config) as runner:

        async def settled() -> bool:
            return int((await redis_client.xpending(tasks, "work"))["pending"]) == 0

        await wait_for(settled, timeout=20, what="every copy acknowledged")
        flow = runner.stats.groups["work"].flow
        assert flow is not None and flow.duplicates == 1
    rows = [f for _, f in await redis_client.xrange(f"{key_prefix}done")]
    assert sorted((f.get("k", ""), f["copy"]) for f in rows) == [
        ("", "keyless"),
        ("", "keyless"),
        ("a", "1"),
        ("b", "1"),
    ]


async def test_an_idempotency_key_publishes_once(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """Two publishes with one idempotency_key: one entry, the same ID twice; another key
    adds another entry."""
    config = make_project(tmp_path, DEDUP_FLOW, url=redis_url, prefix=key_prefix)
    async with Client(load_project(config), redis_client) as client:
        one = await client.send_task({"k": "a"}, idempotency_key="order-1")
        again = await client.send_task({"k": "a"}, idempotency_key="order-1")
        other = await client.send_task({"k": "b"}, idempotency_key="order-2")
    assert one == again != other
    assert await redis_client.xlen(f"{key_prefix}tasks") == 2
    with pytest.raises(CortexFlowError, match="not to a delayed one"):
        await client.send_task({"k": "c"}, idempotency_key="order-3", delay=5)
