"""Duty leases in Redis: one holder at a time, and a fencing token every act checks.

A lease is a string key ``<token> <holder>`` set with NX and an expiry; the token comes
from a counter (the lease key plus ``:fence``) that only ever increments, so a runner
that lost its lease (it stalled past the expiry and another took over) holds a token
that no longer matches. Every act of a duty is a script that first compares the lease
key with the value its holder was given (:data:`FENCE_CHECK`) and does nothing when it
differs. In a cluster, where a lease and the key an act writes may live in different
slots, the check runs just before the act instead of in the same script (see
:func:`fenced_call`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cortex_flow.wire.connection import is_cluster, same_slot

FENCED = "FENCED"  # the start of the error a fenced script answers for a stale holder

# KEYS: pairs of a lease and its counter; ARGV[1] holder, ARGV[2] ttl in ms.
# Returns one token per lease (taken or renewed), or 0 where another holder has it.
ACQUIRE = """
local tokens = {}
for i = 1, #KEYS, 2 do
  local cur = redis.call('GET', KEYS[i])
  local token = 0
  if cur then
    local sp = string.find(cur, ' ', 1, true)
    if sp and string.sub(cur, sp + 1) == ARGV[1] then
      redis.call('PEXPIRE', KEYS[i], ARGV[2])
      token = tonumber(string.sub(cur, 1, sp - 1))
    end
  else
    token = redis.call('INCR', KEYS[i + 1])
    redis.call('SET', KEYS[i], token .. ' ' .. ARGV[1], 'NX', 'PX', ARGV[2])
  end
  tokens[#tokens + 1] = token
end
return tokens
"""

# KEYS[1] lease; ARGV[1] the holder's value: delete the lease only if it is still ours
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The first lines of every fenced script: the lease key is the last of KEYS and ARGV[1]
# the holder's value; an empty ARGV[1] means the caller checked just before (a cluster).
FENCE_CHECK = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[#KEYS]) ~= ARGV[1] then
  return redis.error_reply('FENCED the lease ' .. KEYS[#KEYS] .. ' is no longer held')
end
"""


class LeaseLost(Exception):
    """A fenced act found the lease held by another runner (or expired): it did nothing."""


@dataclass(frozen=True)
class Fence:
    """What a holder of a duty shows with every act: the lease key and its value."""

    key: str
    token: int
    holder: str

    @property
    def value(self) -> str:
        return f"{self.token} {self.holder}"


async def acquire(client: Any, key: str, holder: str, ttl: float) -> Fence | None:
    """Take or renew the lease ``key`` for ``ttl`` seconds; None if another holds it."""
    return (await acquire_all(client, [key], holder, ttl))[0]


async def acquire_all(client: Any, keys: list[str], holder: str, ttl: float) -> list[Fence | None]:
    """:func:`acquire` for several leases (of one slot) in one call."""
    pairs = [k for key in keys for k in (key, f"{key}:fence")]
    tokens = await client.eval(ACQUIRE, len(pairs), *pairs, holder, int(ttl * 1000))
    return [
        Fence(key, int(token), holder) if int(token) else None
        for key, token in zip(keys, tokens, strict=True)
    ]


async def release(client: Any, fence: Fence) -> None:
    """Give the lease up, if it is still ours (a graceful stop: others take over at once)."""
    await client.eval(RELEASE, 1, fence.key, fence.value)


async def holder_of(client: Any, key: str) -> tuple[int, str] | None:
    """The token and holder of a lease, or None when nobody holds it."""
    value = await client.get(key)
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    token, _, holder = text.partition(" ")
    return int(token), holder


async def fenced_call(
    client: Any, script: str, fence: Fence, keys: list[str], args: list[Any]
) -> Any:
    """Run ``script`` (which starts with :data:`FENCE_CHECK`) on ``keys`` as ``fence``'s act.

    The lease key is appended to ``keys`` when all share a slot; otherwise (a cluster)
    the lease is compared by a GET just before, which narrows the window a stale holder
    has to a round trip instead of closing it. Raises :class:`LeaseLost` when the lease
    is no longer ``fence``'s.
    """
    if not is_cluster(client) or same_slot(fence.key, *keys):
        keys, value = [*keys, fence.key], fence.value
    else:
        current = await client.get(fence.key)
        text = current.decode() if isinstance(current, bytes) else current
        if text != fence.value:
            raise LeaseLost(f"the lease {fence.key} is no longer held")
        value = ""
    try:
        return await client.eval(script, len(keys), *keys, value, *args)
    except Exception as exc:
        if str(exc).startswith(FENCED):
            raise LeaseLost(str(exc)[len(FENCED) + 1 :]) from None
        raise


__all__ = [
    "FENCE_CHECK",
    "Fence",
    "LeaseLost",
    "acquire",
    "acquire_all",
    "fenced_call",
    "holder_of",
    "release",
]
