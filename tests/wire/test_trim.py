"""Duty leases and their fencing, and the retention trim's safe floor, on a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cortex_flow.wire.duties import Fence, LeaseLost, acquire, holder_of, release
from cortex_flow.wire.groups import delete_idle_consumer
from cortex_flow.wire.heartbeats import record_transition
from cortex_flow.wire.retention import trim


async def _fill(client: Any, key: str, n: int) -> list[str]:
    return [await client.xadd(key, {"n": str(i)}) for i in range(n)]


async def _lease(client: Any, prefix: str, holder: str = "me", ttl: float = 5.0) -> Fence:
    fence = await acquire(client, f"{prefix}duty:{{t}}", holder, ttl)
    assert fence is not None
    return fence


# --- leases ------------------------------------------------------------------------------


async def test_a_lease_has_one_holder_and_a_new_token_each_time_it_changes_hands(
    redis_client: Any, key_prefix: str
) -> None:
    """A held lease is renewed by its holder, refused to others, and taken with a higher
    token once it expires or is released."""
    key = f"{key_prefix}duty:{{t}}"
    first = await acquire(redis_client, key, "a", 0.2)
    assert first is not None
    assert await acquire(redis_client, key, "b", 0.2) is None
    again = await acquire(redis_client, key, "a", 0.2)
    assert again == first  # renewed: same token
    assert await holder_of(redis_client, key) == (first.token, "a")
    await asyncio.sleep(0.3)  # expired: nobody renewed it
    second = await acquire(redis_client, key, "b", 5.0)
    assert second is not None and second.token > first.token
    await release(redis_client, first)  # not a's any more: left alone
    assert await holder_of(redis_client, key) == (second.token, "b")
    await release(redis_client, second)
    third = await acquire(redis_client, key, "a", 5.0)
    assert third is not None and third.token > second.token


async def test_a_stale_holder_cannot_act(redis_client: Any, key_prefix: str) -> None:
    """With an old token, trim, consumer deletion and agent events do nothing and raise."""
    stream = f"{key_prefix}s"
    await _fill(redis_client, stream, 10)
    current = await _lease(redis_client, key_prefix)
    stale = Fence(current.key, current.token - 1, current.holder)
    with pytest.raises(LeaseLost):
        await trim(redis_client, stale, stream, max_len=1, max_age=None)
    assert await redis_client.xlen(stream) == 10
    await redis_client.xgroup_create(stream, "g", id="$")
    await redis_client.xgroup_createconsumer(stream, "g", "ghost")
    with pytest.raises(LeaseLost):
        await delete_idle_consumer(redis_client, stale, stream, "g", "ghost")
    assert [c["name"] for c in await redis_client.xinfo_consumers(stream, "g")] == ["ghost"]
    events = f"{key_prefix}events"
    with pytest.raises(LeaseLost):
        await record_transition(redis_client, stale, events, "bob", False, {"type": "down"})
    assert await redis_client.xlen(events) == 0
    assert await trim(redis_client, current, stream, max_len=1, max_age=None)


async def test_a_transition_is_published_once(redis_client: Any, key_prefix: str) -> None:
    """The same state recorded twice (two holders in turn) publishes one event; a first
    "up" is recorded without an event, a first "down" publishes one."""
    fence = await _lease(redis_client, key_prefix)
    events = f"{key_prefix}events"
    assert await record_transition(redis_client, fence, events, "bob", True, {"t": "up"}) == 1
    assert await record_transition(redis_client, fence, events, "bob", False, {"t": "d"}) == 2
    assert await record_transition(redis_client, fence, events, "bob", False, {"t": "d"}) == 0
    assert await record_transition(redis_client, fence, events, "eve", False, {"t": "d"}) == 2
    assert [f["t"] for _, f in await redis_client.xrange(events)] == ["d", "d"]


async def test_a_consumer_with_pending_entries_is_not_deleted(
    redis_client: Any, key_prefix: str
) -> None:
    """Deletion happens only at zero pending, checked in the same script."""
    stream = f"{key_prefix}s"
    ids = await _fill(redis_client, stream, 3)
    await redis_client.xgroup_create(stream, "g", id="0")
    await redis_client.xreadgroup("g", "ghost", {stream: ">"}, count=1)
    fence = await _lease(redis_client, key_prefix)
    assert not await delete_idle_consumer(redis_client, fence, stream, "g", "ghost")
    assert (await redis_client.xpending(stream, "g"))["pending"] == 1
    await redis_client.xack(stream, "g", ids[0])
    assert await delete_idle_consumer(redis_client, fence, stream, "g", "ghost")
    assert await redis_client.xinfo_consumers(stream, "g") == []


# --- the safe floor ----------------------------------------------------------------------


async def test_trim_keeps_unread_and_pending_entries(redis_client: Any, key_prefix: str) -> None:
    """Entries a group has not read, or holds pending, stay whatever the cap; the group
    holding the key above its cap is named with how many entries it holds."""
    stream = f"{key_prefix}s"
    ids = await _fill(redis_client, stream, 100)
    await redis_client.xgroup_create(stream, "g", id="0")
    await redis_client.xreadgroup("g", "c", {stream: ">"}, count=30)
    await redis_client.xack(stream, "g", *ids[:10])  # 10..29 pending, 30.. unread
    fence = await _lease(redis_client, key_prefix)
    done = await trim(redis_client, fence, stream, max_len=50, max_age=None)
    assert (done.trimmed, done.length, done.group, done.held) == (10, 90, "g", 40)
    assert done.floor == ids[10]
    assert [i for i, _ in await redis_client.xrange(stream, count=1)] == [ids[10]]
    await redis_client.xack(stream, "g", *ids[10:30])  # all read are acknowledged
    done = await trim(redis_client, fence, stream, max_len=50, max_age=None)
    assert (done.length, done.held) == (70, 20)  # the unread stay
    await redis_client.xreadgroup("g", "c", {stream: ">"})
    await redis_client.xack(stream, "g", *ids[30:])
    done = await trim(redis_client, fence, stream, max_len=50, max_age=None)
    assert (done.length, done.group, done.held) == (50, None, 0)
    assert [i for i, _ in await redis_client.xrange(stream, count=1)] == [ids[50]]


async def test_the_slowest_group_sets_the_floor_declared_or_not(
    redis_client: Any, key_prefix: str
) -> None:
    """Every group on the key counts, one no flow declares included."""
    stream = f"{key_prefix}s"
    ids = await _fill(redis_client, stream, 20)
    await redis_client.xgroup_create(stream, "fast", id="$")
    await redis_client.xgroup_create(stream, "forgotten", id=ids[4])  # has read 0..4
    fence = await _lease(redis_client, key_prefix)
    done = await trim(redis_client, fence, stream, max_len=2, max_age=None)
    assert (done.trimmed, done.length, done.group, done.held) == (5, 15, "forgotten", 13)


async def test_a_stream_no_group_reads_is_trimmed_by_length_and_age_alone(
    redis_client: Any, key_prefix: str
) -> None:
    """No group: max_len keeps the newest entries exactly, max_age drops the old ones."""
    stream = f"{key_prefix}s"
    ids = await _fill(redis_client, stream, 30)
    fence = await _lease(redis_client, key_prefix)
    done = await trim(redis_client, fence, stream, max_len=25, max_age=None)
    assert (done.trimmed, done.length, done.group) == (5, 25, None)
    assert (await redis_client.xrange(stream, count=1))[0][0] == ids[5]
    await asyncio.sleep(0.05)
    newer = await redis_client.xadd(stream, {"n": "new"})
    done = await trim(redis_client, fence, stream, max_len=None, max_age=0.04)
    assert [i for i, _ in await redis_client.xrange(stream)] == [newer]
    missing = await trim(redis_client, fence, f"{key_prefix}none", max_len=1, max_age=None)
    assert (missing.trimmed, missing.length) == (0, 0)


async def test_a_long_trim_is_done_in_calls_of_a_bounded_size(
    redis_client: Any, key_prefix: str
) -> None:
    """By length or by age, one script call trims at most ``limit`` entries; the calls
    together trim exactly what one unbounded call would."""
    stream = f"{key_prefix}s"
    ids = await _fill(redis_client, stream, 95)
    fence = await _lease(redis_client, key_prefix)
    done = await trim(redis_client, fence, stream, max_len=10, max_age=None, limit=20)
    assert (done.trimmed, done.length) == (85, 10)
    assert (await redis_client.xrange(stream, count=1))[0][0] == ids[85]
    await redis_client.xgroup_create(stream, "g", id=ids[89])  # has read up to 89
    await asyncio.sleep(0.01)
    done = await trim(redis_client, fence, stream, max_len=None, max_age=0.001, limit=2)
    assert (done.trimmed, done.length) == (5, 5)
    assert (await redis_client.xrange(stream, count=1))[0][0] == ids[90]
