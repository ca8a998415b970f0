"""Consumer groups in Redis: creating one where it is missing; keys that cannot hold one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError


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
