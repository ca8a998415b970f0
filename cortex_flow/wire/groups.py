"""Consumer groups in Redis: creating one where it is missing, deleting a dead consumer."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

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
