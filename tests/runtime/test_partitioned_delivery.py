"""Partitioned streams end to end on a real Redis: producers, routes, groups, runners."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from projects import NewProject, running, wait_for

from cortex_flow import Client
from cortex_flow.cli import cli
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.slots import partition_of

FLOW = """
    version: 1
    streams:
      chats:
        key: "{P}chats:{{ partition }}:{{ priority }}"
        priorities: [high, low]
        partitions: 4
        partition_key: "{{ msg.conversation }}"
      replies:
        key: "{P}replies:{{ partition }}"
        partitions: 3
        partition_key: "{{ msg.conversation }}"
      spread:
        key: "{P}spread:{{ partition }}"
        partitions: 3
    groups:
      answer:
        stream: chats
        routes:
          - to: replies
"""


async def _by_partition(client: Any, keys: list[str]) -> dict[str, set[str]]:
    """Conversation -> the keys holding its entries."""
    found: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        for _, fields in await client.xrange(key):
            found[fields["conversation"]].add(key)
    return found


async def test_one_conversation_stays_in_one_partition_through_producers_and_routes(
    new_project: NewProject,
    redis_client: Any,
    key_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Client.publish and `cortex-flow send` put a conversation's messages in the
    partition its partition_key picks, a `to` route into a partitioned stream does the
    same, and two runners sharing the group handle each message once."""
    config, _ = new_project(FLOW, name="r1")
    second = new_project(FLOW, name="r2", config_name="second.yaml")[0]
    project = load_project(config)
    client = Client(project, redis_client)
    conversations = [f"c{i}" for i in range(24)]
    for n in range(240):
        conv = conversations[n % 24]
        await client.publish("chats", {"conversation": conv, "n": str(n)}, priority="low")
    args = ("send", "--config", str(config), "chats", '{"conversation": "c5", "n": "240"}')
    assert await asyncio.to_thread(cli, *args) == 0
    sent_to = f"{key_prefix}chats:{{p{partition_of('c5', 4)}}}:low"
    assert capsys.readouterr().out.endswith(f" to {sent_to}\n")
    chats = [f"{key_prefix}chats:{{p{i}}}:{level}" for i in range(4) for level in ("high", "low")]
    placed = await _by_partition(redis_client, chats)
    for conv in conversations:
        assert placed[conv] == {f"{key_prefix}chats:{{p{partition_of(conv, 4)}}}:low"}, conv
    async with running(config), running(second):
        replies = [f"{key_prefix}replies:{{p{i}}}" for i in range(3)]

        async def all_replied() -> bool:
            counts = await asyncio.gather(*(redis_client.xlen(k) for k in replies))
            return bool(sum(counts) == 241)

        await wait_for(all_replied, timeout=30)
    routed = await _by_partition(redis_client, replies)
    for conv in conversations:
        assert routed[conv] == {f"{key_prefix}replies:{{p{partition_of(conv, 3)}}}"}, conv
    numbers = [f["n"] for k in replies for _, f in await redis_client.xrange(k)]
    assert sorted(numbers, key=int) == [str(n) for n in range(241)]  # each once
    for key in chats:
        assert int((await redis_client.xpending(key, "answer"))["pending"]) == 0


async def test_without_a_partition_key_producers_take_partitions_in_turn(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """No partition_key: messages spread evenly over the partitions."""
    config, _ = new_project(FLOW)
    client = Client(load_project(config), redis_client)
    for n in range(30):
        await client.publish("spread", {"n": str(n)})
    counts = [int(await redis_client.xlen(f"{key_prefix}spread:{{p{i}}}")) for i in range(3)]
    assert counts == [10, 10, 10]


OWNED = """
    version: 1
    streams:
      chats:
        key: "{P}chats:{{ partition }}"
        partitions: 6
        partition_key: "{{ msg.conversation }}"
      beats: {key: "{P}beats"}
    heartbeats: {stream: beats}
    groups:
      answer:
        stream: chats
        concurrency: 1
        routes:
          - call: {function: "{M}:record", inline: true}
"""

RECORD = """
    handled = []

    def record(msg):
        handled.append((msg["conversation"], int(msg["n"])))
"""


def _owned(runners: list[Any]) -> list[list[int]]:
    return [r.consumers["answer"].owned() for r in runners]


OTHER = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      beats: {key: "{P}beats"}
    heartbeats: {stream: beats}
    groups:
      jobs:
        stream: jobs
        routes:
          - drop: true
"""


async def test_each_partition_is_read_by_one_runner_so_a_conversation_stays_in_order(
    new_project: NewProject, redis_client: Any, key_prefix: str, redis_url: str, tmp_path: Path
) -> None:
    """Three runners split the six partitions between them (each read by one runner), so
    with concurrency 1 every conversation is handled in publish order; a runner of other
    flows beating on the same stream gets none; a runner that stops hands its partitions
    to the others, and order still holds."""
    from projects import make_project, module

    other = make_project(
        tmp_path / "other",
        OTHER,
        url=redis_url,
        prefix=key_prefix,
        name="r4",
        runner_extra=", heartbeat_interval: 200ms",
    )

    configs = [
        new_project(
            OWNED,
            RECORD,
            name=name,
            config_name=f"{name}.yaml",
            runner_extra=", heartbeat_interval: 200ms",
        )
        for name in ("r1", "r2", "r3")
    ]
    client = Client(load_project(configs[0][0]), redis_client)
    async with running(other), running(configs[0][0]) as r1, running(configs[1][0]) as r2:
        async with running(configs[2][0]) as r3:
            handled = module(configs[-1][1]).handled  # the flows name the last module written

            def split(runners: list[Any]) -> bool:
                owned = _owned(runners)
                flat = sorted(i for part in owned for i in part)
                return all(owned) and flat == list(range(6))

            await wait_for(lambda: split([r1, r2, r3]), timeout=20, what="partitions split")
            for n in range(600):
                await client.publish("chats", {"conversation": f"c{n % 12}", "n": str(n)})
            await wait_for(lambda: len(handled) == 600, timeout=30, what="600 handled")
        # r3 stopped: its partitions move to r1 and r2
        await wait_for(lambda: split([r1, r2]), timeout=20, what="r3's partitions taken over")
        for n in range(600, 900):
            await client.publish("chats", {"conversation": f"c{n % 12}", "n": str(n)})
        await wait_for(lambda: len(handled) == 900, timeout=30, what="900 handled")
    by_conversation: dict[str, list[int]] = defaultdict(list)
    for conversation, n in handled:
        by_conversation[conversation].append(n)
    for conversation, numbers in by_conversation.items():
        assert numbers == sorted(numbers), conversation  # in publish order, once each
    assert sorted(n for _, n in handled) == list(range(900))
