"""Consumer groups in Redis: creating one where it is missing; keys that cannot hold one;
deleting a dead consumer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError

from cortex_flow.wire.duties import FENCE_CHECK, Fence, fenced_call


async def ensure_group(client: Any, key: str, group: str, start: str) -> bool:
    """XGROUP CREATE ... MKSTREAM; True if created. Only BUSYGROUP is tolerated."""
    try:
        await client.xgroup_create(
            key, group, id="0" if start == "earliest" else "$", mkstream=True
        )
        return True
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise


async def wrong_types(client: Any, keys: Iterable[str]) -> dict[str, str]:
    """The keys that exist and hold something other than a stream, with what they hold.

    One pipelined TYPE per key; a missing key is fine (``run`` creates it), and so is a
    key this Redis user may not inspect: the command that needs it reports the refusal
    with the grant that fixes it (``wire/redis_errors.py``), and the rest runs.
    """
    keys = list(keys)
    if not keys:
        return {}
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    found = {}
    for key, kind in zip(keys, await pipe.execute(raise_on_error=False), strict=True):
        if isinstance(kind, NoPermissionError):
            continue
        if isinstance(kind, Exception):
            raise kind
        text = kind.decode() if isinstance(kind, bytes) else str(kind)
        if text not in ("stream", "none"):
            found[key] = text
    return found


# KEYS[1] the stream (then the lease); ARGV[1] the lease value, ARGV[2] the group,
# ARGV[3] the consumer. Deletes the consumer only while nothing is pending for it
# (XGROUP DELCONSUMER would drop its pending entries): 1 deleted, 0 still pending.
DELETE_IDLE_CONSUMER = (
    FENCE_CHECK
    + """
if #redis.call('XPENDING', KEYS[1], ARGV[2], '-', '+', 1, ARGV[3]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[2], ARGV[3])
return 1
"""
)


async def delete_idle_consumer(
    client: Any, fence: Fence, key: str, group: str, consumer: str
) -> bool:
    """Delete ``consumer`` from ``group`` on ``key`` if nothing is pending for it."""
    reply = await fenced_call(client, DELETE_IDLE_CONSUMER, fence, [key], [group, consumer])
    return bool(reply)
