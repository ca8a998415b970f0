"""Delayed messages in Redis: a sorted set per stream key, scored by when each is due.

A delayed message for stream key ``K`` waits in the sorted set ``K:delayed`` (same hash
tag as ``K``) as ``<id> <fields as JSON>``, scored by its due time in ms on the
server's clock. An index (``<ns>{delayed}:due``) scores each such set by its earliest
member, so the mover asks one question per turn however many streams hold delayed
messages. :data:`MOVE` takes the due members off their set and XADDs them to the stream
in one script: never twice, never lost; run only by the holder of the mover duty (it
starts with the fence check). A message whose due time passed while no runner was up
is moved by the first turn of the next one.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from cortex_flow.wire.duties import FENCE_CHECK, Fence, fenced_call

SUFFIX = ":delayed"

# KEYS[1] the set, KEYS[2] the index; ARGV[1] delay in ms, ARGV[2] the member.
# Returns the due time (server clock, ms).
SCHEDULE = """
local t = redis.call('TIME')
local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], due, ARGV[2])
local cur = redis.call('ZSCORE', KEYS[2], KEYS[1])
if not cur or tonumber(cur) > due then redis.call('ZADD', KEYS[2], due, KEYS[1]) end
return due
"""

# KEYS[1] the index (and the lease last); ARGV[2] how many per set at most.
# Returns {moved, {set, error}...}: a set whose stream refuses the XADD keeps its members.
MOVE = (
    FENCE_CHECK
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sets = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
local moved, failed = 0, {}
for _, set in ipairs(sets) do
  local stream = string.sub(set, 1, #set - #'"""
    + SUFFIX
    + """')
  local due = redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
  local err = nil
  for _, m in ipairs(due) do
    local sp = string.find(m, ' ', 1, true)
    local r = redis.pcall('XADD', stream, '*', unpack(cjson.decode(string.sub(m, sp + 1))))
    if type(r) == 'table' and r.err then err = r.err; break end
    redis.call('ZREM', set, m)
    moved = moved + 1
  end
  local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
  if #first == 0 then redis.call('ZREM', KEYS[1], set)
  elseif err then
    redis.call('ZADD', KEYS[1], now + 5000, set)
    failed[#failed + 1] = {set, err}
  else redis.call('ZADD', KEYS[1], first[2], set) end
end
return {moved, failed}
"""
)


# KEYS[1] the index. Per set holding delayed messages: {set, how many, next due (ms)}.
SUMMARY = """
local out = {}
local sets = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, set in ipairs(sets) do
  local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
  if #first > 0 then out[#out + 1] = {set, redis.call('ZCARD', set), first[2]} end
end
return out
"""


def delayed_key(stream_key: str) -> str:
    return stream_key + SUFFIX


def index_key(namespace: str) -> str:
    """The index of the sets that hold delayed messages (the namespace's slot)."""
    tagged = "{" in namespace and "}" in namespace.partition("{")[2]
    return f"{namespace}delayed:due" if tagged else f"{namespace}{{delayed}}:due"


@dataclass(frozen=True)
class Delayed:
    """One delayed message: its id (for cancel), stream key, due time (epoch ms), fields."""

    id: str
    key: str
    due_ms: int
    fields: dict[str, str]


async def schedule(
    client: Any, namespace: str, key: str, fields: dict[str, str], delay: float
) -> Delayed:
    """Hold ``fields`` for stream key ``key`` until ``delay`` seconds from now (server time)."""
    ident = uuid.uuid4().hex
    flat = [x for pair in fields.items() for x in pair]
    member = f"{ident} {json.dumps(flat, separators=(',', ':'))}"
    ms = max(0, round(delay * 1000))
    due = await client.eval(SCHEDULE, 2, delayed_key(key), index_key(namespace), ms, member)
    return Delayed(ident, key, int(due), dict(fields))


async def move_due(
    client: Any, namespace: str, fence: Fence, per_set: int = 1000
) -> tuple[int, list[tuple[str, str]]]:
    """Move every due message to its stream as ``fence``'s act: (moved, [(set, error)])."""
    moved, failed = await fenced_call(client, MOVE, fence, [index_key(namespace)], [per_set])
    return int(moved), [(_text(s), _text(e)) for s, e in failed]


async def waiting(client: Any, namespace: str) -> dict[str, tuple[int, int]]:
    """Per stream key with delayed messages: (how many, next due in epoch ms)."""
    return parse_summary(await client.eval(SUMMARY, 1, index_key(namespace)))


def parse_summary(rows: Any) -> dict[str, tuple[int, int]]:
    """:data:`SUMMARY`'s answer (one call, or one command of a status pipeline) by key."""
    return {
        _text(name)[: -len(SUFFIX)]: (int(count), int(float(_text(due))))
        for name, count, due in rows
    }


async def listing(client: Any, namespace: str, limit: int = 1000) -> list[Delayed]:
    """The delayed messages, earliest first within each stream key, ``limit`` per key."""
    out: list[Delayed] = []
    for key in await waiting(client, namespace):
        rows = await client.zrange(delayed_key(key), 0, limit - 1, withscores=True)
        for raw, score in rows:
            ident, _, body = _text(raw).partition(" ")
            flat = json.loads(body)
            out.append(
                Delayed(ident, key, int(score), dict(zip(flat[::2], flat[1::2], strict=True)))
            )
    return out


async def cancel(client: Any, namespace: str, ident: str) -> Delayed | None:
    """Remove the delayed message ``ident`` before it is moved; None if there is none."""
    for found in await listing(client, namespace, limit=1_000_000):
        if found.id == ident:
            flat = [x for pair in found.fields.items() for x in pair]
            member = f"{ident} {json.dumps(flat, separators=(',', ':'))}"
            if await client.zrem(delayed_key(found.key), member):
                return found
            return None  # moved meanwhile
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = [
    "SUMMARY",
    "Delayed",
    "cancel",
    "delayed_key",
    "index_key",
    "listing",
    "move_due",
    "parse_summary",
    "schedule",
    "waiting",
]
