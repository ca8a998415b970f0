"""Requests through each of the runner's call paths (issue 14 on top of issue 10's hot path).

A table that is one sync call (the sync-call driver's fast path), an inline batch with
plain messages among the requests (plain ones are acknowledged with the next read; a
request's reply goes with its own XACK), and a partitioned stream (the request's key is
the message's partition).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from projects import NewProject, module, none_pending, running, wait_for

from cortex_flow import Client, RequestFailed

FLOWS = """
version: 1
streams:
  onesync: {key: "{P}onesync"}
  oneinline: {key: "{P}oneinline"}
  parts:
    key: "{P}parts:{{ partition }}"
    partitions: 3
    partition_key: "{{ msg.conversation }}"
  dlq: {key: "{P}dlq"}
groups:
  onesync:
    stream: onesync
    dead_letter: dlq
    retry: {max_deliveries: 1}
    routes:
      - call: {M}:sync_double
  oneinline:
    stream: oneinline
    batch: 50
    routes:
      - call: {function: "{M}:inline_double", inline: true}
  parts:
    stream: parts
    routes:
      - call: {function: "{M}:inline_double", inline: true}
"""

HANDLERS = """
handled = []

def sync_double(msg):
    if msg.get("fail"):
        raise ValueError("refused")
    return {"n": int(msg["n"]) * 2, "sync": True}

def inline_double(msg):
    handled.append(msg["n"])
    return {"n": int(msg["n"]) * 2}
"""


@pytest.fixture
def config(new_project: NewProject) -> tuple[Path, str]:
    return new_project(FLOWS, HANDLERS)


async def test_a_table_of_one_sync_call_answers_requests(
    config: tuple[Path, str], redis_client: Any, key_prefix: str
) -> None:
    """The sync-call driver's one-call fast path replies with the call's value, and a
    failure there is the request's failure."""
    path, _ = config
    async with running(path), Client.from_config(path) as client:
        asks = [client.request("onesync", {"n": str(n)}, timeout=10) for n in range(20)]
        assert await asyncio.gather(*asks) == [{"n": 2 * n, "sync": True} for n in range(20)]
        with pytest.raises(RequestFailed, match="refused"):
            await client.request("onesync", {"n": "1", "fail": "1"}, timeout=10)
        assert await none_pending(redis_client, f"{key_prefix}onesync", "onesync")


async def test_an_inline_batch_answers_its_requests_among_plain_messages(
    config: tuple[Path, str], redis_client: Any, key_prefix: str
) -> None:
    """Requests read in one batch with plain messages each get their own reply; the plain
    ones are acknowledged all the same; nothing is left pending, nothing handled twice."""
    path, mod = config
    key = f"{key_prefix}oneinline"
    async with Client.from_config(path) as client:
        for n in range(100):  # a backlog: the runner reads it in batches of 50
            await client.publish("oneinline", {"n": str(1000 + n)})
        async with running(path):
            asks = [client.request("oneinline", {"n": str(n)}, timeout=10) for n in range(30)]
            sends = [client.publish("oneinline", {"n": str(2000 + n)}) for n in range(30)]
            got = await asyncio.gather(*asks, *sends)
            assert got[:30] == [{"n": 2 * n} for n in range(30)]
            await wait_for(lambda: none_pending(redis_client, key, "oneinline"), what="acks")
            handled = module(mod).handled
            await wait_for(lambda: len(handled) >= 160, what="all handled")
        assert sorted(handled, key=int) == sorted(
            [str(n) for n in range(30)]
            + [str(1000 + n) for n in range(100)]
            + [str(2000 + n) for n in range(30)],
            key=int,
        )
        for entry_id in list(client._asked):
            assert (await client.task(entry_id)).state == "completed"


async def test_a_request_to_a_partitioned_stream_goes_to_its_messages_partition(
    config: tuple[Path, str], redis_client: Any, key_prefix: str
) -> None:
    """The request's key is picked from the message (its partition_key), per message."""
    path, _ = config
    async with running(path), Client.from_config(path) as client:
        asks = [
            client.request("parts", {"n": str(n), "conversation": f"c{n}"}, timeout=10)
            for n in range(12)
        ]
        assert await asyncio.gather(*asks) == [{"n": 2 * n} for n in range(12)]
        used = {key for key in client._asked.values()}
        assert len(used) > 1 and all(k.startswith(f"{key_prefix}parts:") for k in used)
