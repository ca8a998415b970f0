"""Reading new entries (``>``) of a group's keys, the highest priority first.

With one key, a blocking XREADGROUP. With several, the :class:`Scheduler` gives the
order to try them in (strict or weighted priority) and a server-side script finds the
first key holding unread entries, so one read takes them; where the script cannot run
(keys in different cluster slots, a server without scripting) each key is tried in
turn. When none has any, one blocking XREADGROUP over every key waits for the next
entry. A passing error running the script (BUSY, NOGROUP, ...) is raised, not a reason
to give the script up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.flow.topology import ResolvedGroup
from cortex_flow.runtime.delivery import Entry, scripting_unavailable
from cortex_flow.runtime.pending import reply_entries
from cortex_flow.runtime.scheduler import Scheduler
from cortex_flow.wire.connection import same_slot

# The index (from 1) of the first of KEYS, in the order given, holding entries group
# ARGV[1] has not read yet, or 0. It reads nothing: the consumer then XREADGROUPs that
# key. (Reading in the script costs Redis several times the read itself: it copies every
# entry into Lua and back.) A missing key or group counts as found: XREADGROUP then
# reports NOGROUP.
FIND_FIRST = """
for i, key in ipairs(KEYS) do
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if groups.err then return i end
  local last
  for _, g in ipairs(groups) do
    local name, id
    for j = 1, #g, 2 do
      if g[j] == 'name' then name = g[j + 1]
      elseif g[j] == 'last-delivered-id' then id = g[j + 1] end
    end
    if name == ARGV[1] then last = id break end
  end
  if last == nil then return i end
  if #redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', 1) > 0 then return i end
end
return 0
"""


class GroupReader:
    """Reads new entries for one consumer (``group.consumer``) of one group.

    ``sleep(seconds)`` waits unless the consumer is stopping; it paces polling where
    Redis cannot block for us.
    """

    def __init__(
        self,
        client: Any,
        group: ResolvedGroup,
        *,
        block_ms: int,
        cluster: bool,
        sleep: Callable[[float], Awaitable[None]],
        log: logging.Logger,
    ) -> None:
        self.client = client
        self.name = group.name
        self.me = group.consumer
        self.keys = list(group.keys)
        self.block_ms = block_ms
        self.cluster = cluster
        self.log = log
        self._sleep = sleep
        self._scheduler = Scheduler(self.keys, group.spec.priority, group.spec.weights)
        self._script: Any = None
        if len(self.keys) > 1 and (not cluster or same_slot(*[k.key for k in self.keys])):
            self._script = client.register_script(FIND_FIRST)

    async def fetch(
        self, count: int, block: bool = True, block_ms: int | None = None
    ) -> list[Entry]:
        """Read up to ``count`` new entries, waiting up to ``block_ms`` (default: the
        reader's) for some if ``block``."""
        block_ms = (block_ms or self.block_ms) if block else None
        if len(self.keys) == 1:
            key = self.keys[0]
            resp = await self.client.xreadgroup(
                self.name, self.me, {key.key: ">"}, count=count, block=block_ms
            )
            return reply_entries(key, resp[0][1]) if resp else []
        order = self._scheduler.order()
        first = None
        if self._script is not None:
            try:
                first = await self._script(keys=[self.keys[i].key for i in order], args=[self.name])
            except ResponseError as exc:
                if not scripting_unavailable(exc):
                    raise  # NOGROUP, BUSY, ...: the consumer loop backs off and tries again
                self.log.warning(
                    "group %s: the fetch script cannot run (%s); keys are now read one by one",
                    self.name,
                    exc,
                )
                self._script = None
        if first is not None:
            if first:
                index = order[int(first) - 1]
                key = self.keys[index]
                resp = await self.client.xreadgroup(self.name, self.me, {key.key: ">"}, count=count)
                if resp and resp[0][1]:
                    self._scheduler.served(index)
                    return reply_entries(key, resp[0][1])
                return []  # another consumer of the group took them meanwhile: look again
        else:  # no script (or it just turned out it cannot run): each key in turn
            for index in order:
                key = self.keys[index]
                resp = await self.client.xreadgroup(self.name, self.me, {key.key: ">"}, count=count)
                if resp and resp[0][1]:
                    self._scheduler.served(index)
                    return reply_entries(key, resp[0][1])
        if block_ms is None:
            return []  # not waiting: every key was looked at above
        if self.cluster and self._script is None:
            await self._sleep(block_ms / 1000)  # keys in different slots: poll
            return []
        started = time.monotonic()
        resp = await self.client.xreadgroup(
            self.name, self.me, {k.key: ">" for k in self.keys}, count=count, block=block_ms
        )
        if not resp:
            if time.monotonic() - started < block_ms / 2000:
                await self._sleep(0.02)  # a server (or fake) that does not block
            return []
        by_key = {k.key: k for k in self.keys}
        rank = {k.key: i for i, k in enumerate(self.keys)}
        entries: list[Entry] = []
        for stream, items in sorted(resp, key=lambda r: rank[r[0]]):
            entries.extend(reply_entries(by_key[stream], items))
        return entries
