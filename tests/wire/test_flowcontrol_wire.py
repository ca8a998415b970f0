"""The flow-control scripts against a real server: buckets, slots and dedup markers."""

from __future__ import annotations

from typing import Any

from projects import wait_for

from cortex_flow.wire.flowcontrol import (
    DUPLICATE,
    RUN,
    WAIT,
    dedup_states,
    group_key,
    release_slots,
    renew_slots,
    take_slots,
    take_tokens,
)


async def test_buckets_give_a_burst_then_say_how_long_to_wait(
    redis_client: Any, key_prefix: str
) -> None:
    """A full bucket of 5 gives 5 of 8 wanted in one call and names the wait for the next
    chunk of 2 at 10/s (~200ms); another bucket (another key) is untouched by it."""
    a, b = f"{key_prefix}rate:a", f"{key_prefix}rate:b"
    [(got, wait, left)] = await take_tokens(redis_client, [a], 10 / 1000, 5, [(8, 2)])
    assert got == 5 and 150 <= wait <= 210 and left == 0
    [(got_a, _, _), (got_b, _, _)] = await take_tokens(
        redis_client, [a, b], 10 / 1000, 5, [(1, 1), (5, 1)]
    )
    assert got_a == 0 and got_b == 5


async def test_slots_are_bounded_released_and_expire(redis_client: Any, key_prefix: str) -> None:
    """Two slots: three ask, two take; a release frees one; an unrenewed lease expires."""
    key = f"{key_prefix}slots"
    assert await take_slots(redis_client, key, 2, 60_000, ["a", "b", "c"]) == 2
    assert await take_slots(redis_client, key, 2, 60_000, ["c"]) == 0
    await release_slots(redis_client, key, ["a"])
    assert await take_slots(redis_client, key, 2, 100, ["c"]) == 1
    await renew_slots(redis_client, key, 60_000, ["b"])

    async def c_expired() -> bool:
        return await take_slots(redis_client, key, 2, 60_000, ["d"]) == 1

    await wait_for(c_expired, timeout=5, what="the unrenewed slot to expire")
    assert set(await redis_client.zrange(key, 0, -1)) == {"b", "d"}


async def test_a_copy_waits_while_the_first_is_pending_and_is_a_duplicate_once_acked(
    redis_client: Any, key_prefix: str
) -> None:
    """The first entry with a key runs (and again on its retry); a copy waits while the
    first is pending in the group and is a duplicate once the first is acknowledged."""
    stream, marker = f"{key_prefix}tasks", f"{key_prefix}dedup:k"
    await redis_client.xgroup_create(stream, "g", id="0", mkstream=True)
    first = await redis_client.xadd(stream, {"k": "1"})
    copy = await redis_client.xadd(stream, {"k": "1"})
    await redis_client.xreadgroup("g", "c1", {stream: ">"})
    rows = [(marker, stream, first), (marker, stream, copy)]
    assert await dedup_states(redis_client, "g", 60_000, rows) == [RUN, WAIT]
    assert await dedup_states(redis_client, "g", 60_000, rows[:1]) == [RUN]
    await redis_client.xack(stream, "g", first)
    assert await dedup_states(redis_client, "g", 60_000, rows[1:]) == [DUPLICATE]


def test_group_keys_share_one_slot_per_group() -> None:
    """``{fc:<group>}`` after the namespace, or the namespace's own hash tag."""
    assert group_key("app:", "work", "rate:") == "app:{fc:work}:rate:"
    assert group_key("{app}:", "work", "inflight") == "{app}:fc:work:inflight"
