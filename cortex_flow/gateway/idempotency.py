"""``Idempotency-Key``: publish once per (agent, key), answer the first entry's ID after.

One script does both steps where the keys share a slot: when the remembered key exists,
its entry ID is returned and nothing is added; otherwise the XADD and the SET (with the
TTL) happen together, so a crash between them cannot leave a key without its entry. The
remembered key carries the stream key's hash tag (``{key}:idem:...``), so on a cluster it
lies in the stream's slot.

This is the gateway's own until the publish path takes an ``idempotency_key=`` of its own
(the rate-limit and dedup work); then the header should call that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

__all__ = ["idempotency_key", "publish_once"]

_ONCE = """
local first = redis.call('GET', KEYS[2])
if first then return {first, 1} end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[1]))
return {id, 0}
"""


def _tag(key: str) -> str:
    """``key``'s cluster hash tag as Redis reads it, or the whole key."""
    start = key.find("{")
    end = key.find("}", start + 1)
    if start >= 0 and end > start + 1:
        return key[start + 1 : end]
    return key


def idempotency_key(stream_key: str, agent: str, key: str) -> str:
    """Where the first entry's ID of ``key`` for ``agent`` on ``stream_key`` is kept."""
    digest = hashlib.sha256(f"{agent}\0{key}".encode()).hexdigest()[:32]
    return f"{{{_tag(stream_key)}}}:idem:{digest}"


async def publish_once(
    client: Any, stream_key: str, remember: str, fields: Mapping[str, Any], ttl: int
) -> tuple[str, bool]:
    """XADD ``fields`` unless ``remember`` holds an earlier ID: ``(id, replayed)``."""
    flat: list[Any] = []
    for name, value in fields.items():
        flat.extend((name, value))
    entry_id, replayed = await client.eval(_ONCE, 2, stream_key, remember, ttl, *flat)
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return text, bool(replayed)
