"""What flow control keeps in Redis: token buckets, in-flight slots and dedup markers.

Every script reads the clock of the server (``TIME``), so runners whose clocks differ
still share one rate. The keys of a group share a hash tag (:func:`group_key`).

- A **token bucket** is a hash ``{t: tokens, ts: ms}``; :data:`TAKE` refills it for the
  time passed, takes up to the tokens asked at once (one call per batch, not per
  message) and answers how long until the next chunk is there.
- **Slots** (``max_in_flight``) are a sorted set of holders scored by when their lease
  ends: a runner that dies stops renewing, and its slots free themselves.
- A **dedup marker** names the entry (``<stream key> <id>``) that first carried a key.
  The first copy's commit (its XACK) is what marks it handled, so a copy is a duplicate
  exactly when the marked entry is no longer pending in the group: atomic with the
  commit of the first without a write of its own.
"""

from __future__ import annotations

import weakref
from typing import Any

# KEYS: buckets; ARGV[1] tokens per ms, ARGV[2] burst, then per bucket: wanted, chunk.
# Returns per bucket {taken, ms until `chunk` (or what is still wanted) are there,
# whole tokens left}.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS do
  local want, chunk = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local v = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tokens, ts = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or ts == nil then tokens, ts = burst, now end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  local got = math.min(want, math.floor(tokens))
  tokens = tokens - got
  redis.call('HSET', KEYS[i], 't', string.format('%.6f', tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate) + 1000)
  local need = math.min(want - got, chunk)
  local wait = 0
  if need > 0 then wait = math.ceil((need - tokens) / rate) end
  out[#out + 1] = {got, wait, math.floor(tokens)}
end
return out
"""

# KEYS[1] slots; ARGV[1] the limit, ARGV[2] lease ms, then the holders asking.
# Returns how many of them (in order) took a slot.
SLOTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local got = 0
for i = 3, #ARGV do
  if got >= free then break end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i])
  got = got + 1
end
return got
"""

# KEYS[1] slots; ARGV[1] lease ms, then holders: extend the leases of those still held
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
return 0
"""

RUN, DUPLICATE, WAIT = 1, 0, 2

# KEYS: marker and stream key pairs; ARGV[1] group, ARGV[2] window ms, then entry ids.
# Per entry: RUN (first seen, or the marked entry itself), DUPLICATE (the marked entry
# is no longer pending: committed) or WAIT (the marked entry is still being handled).
DEDUP = """
local out = {}
for i = 1, #KEYS, 2 do
  local me = KEYS[i + 1] .. ' ' .. ARGV[2 + (i + 1) / 2]
  local cur = redis.call('GET', KEYS[i])
  if not cur then
    redis.call('SET', KEYS[i], me, 'PX', ARGV[2])
    out[#out + 1] = 1
  elseif cur == me then
    out[#out + 1] = 1
  else
    local sp = string.find(cur, ' ', 1, true)
    local id = string.sub(cur, sp + 1)
    local p = redis.pcall('XPENDING', string.sub(cur, 1, sp - 1), ARGV[1], id, id, 1)
    if type(p) == 'table' and p.err == nil and #p > 0 then out[#out + 1] = 2
    else out[#out + 1] = 0 end
  end
end
return out
"""


_scripts: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _script(client: Any, source: str) -> Any:
    """The script registered on ``client`` (EVALSHA, loaded again on NOSCRIPT)."""
    known = _scripts.setdefault(client, {})
    script = known.get(source)
    if script is None:
        script = known[source] = client.register_script(source)
    return script


def group_key(namespace: str, group: str, what: str) -> str:
    """A flow-control key of ``group``: ``<ns>{fc:<group>}:<what>`` (one slot per group)."""
    tagged = "{" in namespace and "}" in namespace.partition("{")[2]
    return f"{namespace}fc:{group}:{what}" if tagged else f"{namespace}{{fc:{group}}}:{what}"


async def take_tokens(
    client: Any, buckets: list[str], per_ms: float, burst: int, wants: list[tuple[int, int]]
) -> list[tuple[int, int, int]]:
    """Take tokens from ``buckets``, ``(wanted, chunk)`` each; per bucket ``(taken, ms to
    wait for a chunk more, whole tokens left)``."""
    args = [repr(per_ms), burst, *(n for pair in wants for n in pair)]
    rows = await _script(client, TAKE)(keys=buckets, args=args)
    return [(int(got), int(wait), int(left)) for got, wait, left in rows]


async def take_slots(client: Any, key: str, limit: int, lease_ms: int, holders: list[str]) -> int:
    """How many of ``holders`` (in order) took one of the ``limit`` slots."""
    return int(await _script(client, SLOTS)(keys=[key], args=[limit, lease_ms, *holders]))


async def renew_slots(client: Any, key: str, lease_ms: int, holders: list[str]) -> None:
    if holders:
        await _script(client, RENEW)(keys=[key], args=[lease_ms, *holders])


async def release_slots(client: Any, key: str, holders: list[str]) -> None:
    if holders:
        await client.zrem(key, *holders)


async def dedup_states(
    client: Any, group: str, window_ms: int, rows: list[tuple[str, str, str]]
) -> list[int]:
    """Per ``(marker, stream key, entry id)``: :data:`RUN`, :data:`DUPLICATE` or :data:`WAIT`."""
    keys = [k for marker, key, _ in rows for k in (marker, key)]
    args = [group, window_ms, *(r[2] for r in rows)]
    states = await _script(client, DEDUP)(keys=keys, args=args)
    return [int(s) for s in states]


__all__ = [
    "DUPLICATE",
    "RUN",
    "WAIT",
    "dedup_states",
    "group_key",
    "release_slots",
    "renew_slots",
    "take_slots",
    "take_tokens",
]
