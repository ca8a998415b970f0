"""Reading new entries (``>``) of a group's keys, the highest priority first.

With one key, a blocking XREADGROUP. With several in strict priority, one XREADGROUP
reads the keys from the highest down to the level that served last (the others above
it are usually empty: a new entry there is still read first); only when those have
nothing does the next read go one level further down. So a backlog on one level costs
one round trip a batch and no script, and an entry of a higher level is read in the
next round trip. In weighted priority the :class:`Scheduler` gives the order to try
the keys in and a server-side script finds the first holding unread entries, so one
read takes them. Where neither can run (keys in different cluster slots, a server
without scripting) each key is tried in turn. When none has any, one blocking
XREADGROUP over every key waits for the next entry. A passing error running the
script (BUSY, NOGROUP, ...) is raised, not a reason to give the script up.

An idle group costs one command per wait: once a blocking read came back empty, the
next read is that blocking read again, without the non-blocking look or the script
first (a blocking XREADGROUP answers at once when any of its keys holds new entries).
Keys of one group in different cluster slots cannot block in one read: the group polls
them, and says so once when it starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.flow.topology import ResolvedGroup
from cortex_flow.runtime.delivery import Acks, Entry, scripting_unavailable
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
        acked: Callable[[list[Acks], list[Any]], None] | None = None,
    ) -> None:
        self.client = client
        self.name = group.name
        self.me = group.consumer
        self.keys = list(group.keys)
        self.block_ms = block_ms
        self.cluster = cluster
        self.log = log
        self._sleep = sleep
        # plain acknowledgements sent in the same pipeline as the next read (one round
        # trip for both); ``acked(acks, replies)`` is told each XACK's reply or error
        self.acks: list[Acks] = []
        self._acked = acked
        self._scheduler = Scheduler(self.keys, group.spec.priority, group.spec.weights)
        self._script: Any = None
        self._descend = False  # strict: read the levels from the top down to ``_level``
        self._level = 0
        # read along with entries of a higher level: held (pending to us, leased by the
        # consumer) until nothing waits above them; highest priority first
        self.parked: list[Entry] = []
        self._by_key = {k.key: k for k in self.keys}
        self._rank = {k.key: i for i, k in enumerate(self.keys)}
        # the last blocking read found nothing: the next one need not look first
        self._idle = False
        self.polls = len(self.keys) > 1 and cluster and not same_slot(*self._by_key)
        if len(self.keys) > 1 and not self.polls:
            if group.spec.priority == "weighted":
                self._script = client.register_script(FIND_FIRST)
            else:
                self._descend = True
        # whether ``acks`` go with the first read of every fetch (before any BLOCK)
        self.takes_acks = (
            acked is not None and not cluster and (len(self.keys) == 1 or self._descend)
        )
        if self.polls:
            log.warning(
                "group %s: its %d keys (%s) are in different cluster slots, so one read "
                "cannot wait on them all: it polls them every %.1fs (up to that much latency, "
                "%d commands a poll). Give the stream's key one hash tag (e.g. "
                '"{%s}:...") or use partitions: N; `cortex-flow validate` names the keys',
                self.name,
                len(self.keys),
                ", ".join(self._by_key),
                block_ms / 1000,
                len(self.keys),
                group.stream,
            )

    @property
    def idle(self) -> bool:
        """Whether the last blocking read found nothing."""
        return self._idle

    async def fetch(
        self, count: int, block: bool = True, block_ms: int | None = None
    ) -> list[Entry]:
        """Read up to ``count`` new entries, waiting up to ``block_ms`` (default: the
        reader's) for some if ``block``."""
        block_ms = (block_ms or self.block_ms) if block else None
        # idle (the last wait found nothing), with no acknowledgement to carry first
        waiting = self._idle and block_ms is not None and not self.parked and not self.acks
        if len(self.keys) == 1:
            key = self.keys[0]
            streams = {key.key: ">"}
            # a backlog is read without BLOCK (redis-py then waits on the socket with
            # the command's own timeout, which costs it more per call)
            resp = None
            if not waiting:
                resp = await self._read(streams, count)
            if not (resp and resp[0][1]) and block_ms is not None:
                resp = await self.client.xreadgroup(
                    self.name, self.me, streams, count=count, block=block_ms
                )
                self._idle = not (resp and resp[0][1])
            return reply_entries(key, resp[0][1]) if resp and resp[0][1] else []
        if waiting and not self.polls:  # idle: straight to the blocking read over all keys
            return await self._wait_any(count, block_ms or self.block_ms)
        if self._descend:
            entries = await self._descending(count)
            if entries or block_ms is None or self.parked:
                return entries
            return await self._wait_any(count, block_ms)
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
        if self.polls:  # keys in different slots: poll, at the reader's pace (not idle's)
            await self._sleep(min(block_ms, self.block_ms) / 1000)
            return []
        return await self._wait_any(count, block_ms)

    async def _descending(self, count: int) -> list[Entry]:
        """Strict: the keys from the top down to the level last served, then further."""
        if self.parked:
            return await self._above_parked(count)
        last = len(self.keys) - 1
        level = self._level
        while True:
            streams = {k.key: ">" for k in self.keys[: level + 1]}
            resp = await self._read(streams, count)
            entries = self._entries(resp)
            if entries:
                return self._highest(entries)
            if level == last:
                self._level = 0
                return []
            level += 1

    async def _above_parked(self, count: int) -> list[Entry]:
        """Entries of the keys above the highest parked one; none: that key's parked ones."""
        top = self._rank[self.parked[0].key.key]
        if top:
            streams = {k.key: ">" for k in self.keys[:top]}
            resp = await self._read(streams, count)
            entries = self._entries(resp)
            if entries:
                return self._highest(entries)
        key = self.parked[0].key
        cut = next((i for i, e in enumerate(self.parked) if e.key is not key), len(self.parked))
        released, self.parked = self.parked[:cut], self.parked[cut:]
        self._level = top
        return released

    async def _read(self, streams: dict[str, str], count: int) -> Any:
        """XREADGROUP without BLOCK; the acknowledgements waiting go in the same pipeline.

        XACK is idempotent: when the pipeline fails, whether they were applied is not
        known, and they are sent again with the next read.
        """
        acks, acked = self.acks, self._acked
        if not acks or acked is None or not self.takes_acks:
            return await self.client.xreadgroup(self.name, self.me, streams, count=count)
        self.acks = []
        pipe = self.client.pipeline(transaction=False)
        for ack in acks:
            pipe.xack(ack.key, self.name, *[e.id for e in ack.entries])
        pipe.xreadgroup(self.name, self.me, streams, count=count)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException:
            self.acks[:0] = acks
            raise
        acked(acks, replies[:-1])
        resp = replies[-1]
        if isinstance(resp, Exception):
            raise resp
        return resp

    def _highest(self, entries: list[Entry]) -> list[Entry]:
        """The entries of the highest key among ``entries`` (sorted by priority); the
        rest are parked until nothing waits above them, so that an entry arriving on a
        higher level meanwhile is still handled first."""
        key = entries[0].key
        self._level = self._rank[key.key]
        if entries[-1].key is key:
            return entries
        cut = next(i for i, e in enumerate(entries) if e.key is not key)
        self.parked[:0] = entries[cut:]  # all below ``key``, above what was parked before
        return entries[:cut]

    def drop_parked(self) -> list[Entry]:
        """Forget the parked entries (they stay pending under our name); returns them."""
        dropped, self.parked = self.parked, []
        return dropped

    async def _wait_any(self, count: int, block_ms: int) -> list[Entry]:
        """One blocking read over every key (nothing was waiting in any)."""
        started = time.monotonic()
        resp = await self.client.xreadgroup(
            self.name, self.me, {k.key: ">" for k in self.keys}, count=count, block=block_ms
        )
        self._idle = not resp
        if not resp:
            if time.monotonic() - started < block_ms / 2000:
                await self._sleep(0.02)  # a server (or fake) that does not block
            return []
        entries = self._entries(resp)
        return self._highest(entries) if entries and self._descend else entries

    def _entries(self, resp: Any) -> list[Entry]:
        """A multi-key reply's entries, the highest priority first."""
        if not resp:
            return []
        if len(resp) == 1:
            stream, items = resp[0]
            return reply_entries(self._by_key[stream], items) if items else []
        rank = self._rank
        entries: list[Entry] = []
        for stream, items in sorted(resp, key=lambda r: rank[r[0]]):
            entries.extend(reply_entries(self._by_key[stream], items))
        return entries
