"""Trimming a stream key without losing work: the safe floor, then length and age.

The safe floor of a key is the lowest entry ID some consumer group on it still needs:
for each group (declared in a flow or not), its oldest pending entry, or the entry after
its last-delivered ID when that comes first (entries after it are unread). Nothing at
or above the floor is trimmed. Below it, ``max_len`` trims the oldest entries past the
cap and ``max_age`` the entries older than the age; the trim is one
``XTRIM key MINID <bound>`` with

    bound = min(floor, max(length bound, age bound))

computed and applied in one script, so no group can move in between. A key no group
reads has no floor: length and age alone decide. One call trims at most
:data:`TRIM_LIMIT` entries (a long-held key let go, or a first pass over an old
stream, must not block the server); :func:`trim` calls again until it is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cortex_flow.wire.duties import FENCE_CHECK, Fence, fenced_call

TRIM_LIMIT = 10_000  # entries one script call trims at most

# KEYS[1] the stream (then the lease); ARGV[1] the lease value (FENCE_CHECK),
# ARGV[2] max_len (0: none), ARGV[3] max_age in ms (0: none), ARGV[4] the most to trim.
# Returns {trimmed, length after, holding group or false, held above max_len, floor or
# false, 1 when it stopped at the limit with more to trim}.
TRIM = (
    FENCE_CHECK
    + """
local key = KEYS[1]
if redis.call('TYPE', key).ok ~= 'stream' then return {0, 0, false, 0, false, 0} end
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return {tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))}
end
local function below(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local function text(id) return string.format('%.0f-%.0f', id[1], id[2]) end
local floor, holder = nil, false
for _, row in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local g = {}
  for i = 1, #row, 2 do g[row[i]] = row[i + 1] end
  local need = parse(g['last-delivered-id'])
  need[2] = need[2] + 1
  if g['pending'] > 0 then
    local oldest = parse(redis.call('XPENDING', key, g['name'])[2])
    if below(oldest, need) then need = oldest end
  end
  if floor == nil or below(need, floor) then floor, holder = need, g['name'] end
end
local maxlen, maxage, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local length = redis.call('XLEN', key)
local upto = '+'
if floor then upto = '(' .. text(floor) end
local function after_nth(n)  -- the ID after the nth oldest entry below the floor
  local oldest = redis.call('XRANGE', key, '-', upto, 'COUNT', n)
  if #oldest == 0 then return {0, 0}, 0 end
  local id = parse(oldest[#oldest][1])
  id[2] = id[2] + 1
  return id, #oldest
end
local bound, more = {0, 0}, 0
if maxlen > 0 and length > maxlen then
  local excess = length - maxlen
  local n
  bound, n = after_nth(math.min(excess, limit))
  if n == limit and excess > limit then more = 1 end
end
if maxage > 0 then
  local now = redis.call('TIME')
  local aged = {tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - maxage, 0}
  if below(bound, aged) then
    bound = aged
    if floor and below(floor, bound) then bound = floor end
    local capped, n = after_nth(limit)
    if n == limit and below(capped, bound) then bound, more = capped, 1 end
  end
end
if floor and below(floor, bound) then bound = floor end
local trimmed = 0
if bound[1] > 0 or bound[2] > 0 then
  trimmed = redis.call('XTRIM', key, 'MINID', text(bound))
end
length = length - trimmed
local held = 0
if maxlen > 0 and length > maxlen then held = length - maxlen end
if held == 0 then holder = false end
local shown = false
if floor then shown = text(floor) end
return {trimmed, length, holder, held, shown, more}
"""
)


@dataclass(frozen=True)
class Trimmed:
    """What one trim of one key did, and who holds it above its cap."""

    key: str
    trimmed: int
    length: int
    group: str | None  # the group whose floor kept ``held`` entries above max_len
    held: int
    floor: str | None  # the lowest entry ID some group still needs


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def trim(
    client: Any,
    fence: Fence,
    key: str,
    *,
    max_len: int | None,
    max_age: float | None,
    limit: int = TRIM_LIMIT,
) -> Trimmed:
    """Trim ``key`` to its safe floor, as ``fence``'s act (see the module docstring);
    ``limit`` entries per script call, as many calls as it takes."""
    total = 0
    while True:
        reply = await fenced_call(
            client, TRIM, fence, [key], [max_len or 0, int((max_age or 0) * 1000), limit]
        )
        trimmed, length, group, held, floor, more = reply
        total += int(trimmed)
        if not int(more) or not int(trimmed):
            break
    return Trimmed(
        key,
        total,
        int(length),
        _text(group) if group else None,
        int(held),
        _text(floor) if floor else None,
    )


__all__ = ["TRIM", "Trimmed", "trim"]
