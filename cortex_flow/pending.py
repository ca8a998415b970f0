"""Entries delivered but not acknowledged, and how a consumer takes them back.

Four ways, all ending in XCLAIM (or XAUTOCLAIM) to this consumer and then the same
path as a fresh read, with ``deliveries`` from Redis' delivery count:

- its own pending entries, at start and after a lost connection (a previous run, or
  what it held when the connection dropped): all of them, at once;
- its failed entries, once idle past the backoff for their delivery count;
- any consumer's entries idle past ``claim_idle`` (XAUTOCLAIM), a crashed runner's;
- the entries of consumers whose runner or agent went down, without waiting.

An entry claimed once more than ``max_deliveries`` allows is dead-lettered without
running it: each delivery so far crashed or timed out its consumer. An entry deleted
or trimmed from the stream while pending is acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cortex_flow.delivery import DEAD, Entry, Outcome, pairs
from cortex_flow.stats import KeyStats
from cortex_flow.topology import ResolvedGroup, StreamKey

# XPENDING pages of ``batch`` rows scanned per key in one retry round, at most; the
# scan goes on from there in the next round
RETRY_SCAN_PAGES = 10


@dataclass(slots=True)
class _DownConsumer:
    """The pending entries of ``name`` on ``key`` still to claim; its runner is down."""

    key: StreamKey
    name: str
    after: str = "-"  # XPENDING start of the next page
    claimed: int = 0


def reply_entries(
    key: StreamKey, items: list[Any] | None, counts: Mapping[str, int] | None = None
) -> list[Entry]:
    """Entries of ``key`` in an XREADGROUP, XCLAIM or XAUTOCLAIM reply.

    ``counts``: each entry's deliveries before this one (none when not given).
    """
    before = counts or {}
    entries = []
    for item in items or []:
        entry_id, fields = item[0], item[1]
        if entry_id is None or fields is None:  # deleted (Redis 6.2 sends a nil)
            continue
        if isinstance(fields, list):
            fields = pairs(fields)
        entries.append(Entry(key, entry_id, fields, before.get(entry_id, 0) + 1))
    return entries


class PendingWork:
    """Takes back one consumer's share of its group's pending entries.

    ``inflight`` is the consumer's own set of (key, id) it holds: never claimed again.
    ``capacity()`` is how many more entries it can start now; ``dispatch`` hands it
    entries to run (beyond its free slots they wait in its backlog), ``commit``
    applies outcomes.
    """

    def __init__(
        self,
        client: Any,
        group: ResolvedGroup,
        key_stats: Mapping[str, KeyStats],
        *,
        inflight: set[tuple[str, str]],
        capacity: Callable[[], int],
        dispatch: Callable[[list[Entry]], Awaitable[None]],
        commit: Callable[[list[Outcome]], Awaitable[None]],
        log: logging.Logger,
    ) -> None:
        self.client = client
        self.name = group.name
        self.me = group.consumer
        self.keys = list(group.keys)
        self.spec = group.spec
        self.max_deliveries = group.spec.retry.max_deliveries
        self.log = log
        self._key_stats = key_stats
        self._inflight = inflight
        self._capacity = capacity
        self._dispatch = dispatch
        self._commit = commit
        self._autoclaim_cursor: dict[str, str] = {}
        self._retry_from: dict[str, str] = {}
        self._down: list[_DownConsumer] = []

    def backoff_ms(self, deliveries: int) -> int:
        """How long an entry delivered ``deliveries`` times waits before the next try."""
        b = self.spec.retry.backoff
        return int(min(b.initial * b.multiplier ** max(deliveries - 1, 0), b.max) * 1000)

    # -- own pending -------------------------------------------------------------------

    async def take_own(self) -> None:
        """Take back every entry pending under our name, whatever its idle time."""
        for key in self.keys:
            start = "-"
            while True:
                rows = await self.client.xpending_range(
                    key.key, self.name, start, "+", self.spec.batch, consumername=self.me
                )
                if not rows:
                    break
                await self._take(key, rows, 0)
                if len(rows) < self.spec.batch:
                    break
                start = "(" + rows[-1]["message_id"]

    async def retry_due(self) -> None:
        """Claim back our failed entries whose backoff has passed, as many as we have room for.

        XPENDING lists entries in ID order, so an old entry waiting out a long backoff
        comes before newer ones already due. The scan of each key goes on from where the
        previous round stopped, ``RETRY_SCAN_PAGES`` pages at most per round, and starts
        over once it reaches the end: every entry is looked at within a few rounds.
        """
        first = self.backoff_ms(1)
        batch = self.spec.batch
        for key in self.keys:
            room = self._capacity()
            if room == 0:
                return
            start = self._retry_from.get(key.key, "-")
            due: list[dict[str, Any]] = []
            for _ in range(RETRY_SCAN_PAGES):
                rows = await self.client.xpending_range(
                    key.key, self.name, start, "+", batch, consumername=self.me, idle=first
                )
                due.extend(
                    r
                    for r in rows
                    if r["time_since_delivered"] >= self.backoff_ms(int(r["times_delivered"]))
                    and (key.key, r["message_id"]) not in self._inflight
                )
                if len(rows) < batch:
                    start = "-"
                    break
                start = "(" + rows[-1]["message_id"]
                if len(due) >= room:
                    break
            if len(due) > room:
                due = due[:room]
                start = "(" + due[-1]["message_id"]  # the rest are found from there next time
            self._retry_from[key.key] = start
            if due:
                await self._take(key, due, first)

    # -- other consumers' pending ------------------------------------------------------

    def request_claim(self, consumers: Iterable[str]) -> None:
        """Claim the pending entries of ``consumers`` (their runner or agent is down)."""
        names = sorted(set(consumers) - {self.me})
        queued = {(d.key.key, d.name): d for d in self._down}
        for key in self.keys:
            for name in names:
                down = queued.get((key.key, name))
                if down is None:
                    self._down.append(_DownConsumer(key, name))
                else:
                    down.after = "-"  # down again: it may have read older entries meanwhile

    @property
    def claiming(self) -> bool:
        """True while pending entries of a down consumer remain to be claimed."""
        return bool(self._down)

    async def claim_from_down(self) -> None:
        """Claim a page (``batch`` entries) of each down consumer's entries we have room for.

        A page is claimed only while a slot is free; what goes beyond the free slots waits
        in the consumer's backlog, so no more than ``concurrency`` run, and no more than
        one page waits there: entries claimed long before they can start would idle past
        ``claim_idle`` and be claimed again by yet another consumer.
        """
        batch = self.spec.batch
        for down in list(self._down):
            if self._capacity() == 0:
                return
            key = down.key
            rows = await self.client.xpending_range(
                key.key, self.name, down.after, "+", batch, consumername=down.name
            )
            if rows:
                if down.claimed == 0:
                    self.log.info(
                        "group %s: claiming the pending entries of %s from consumer %s (down)",
                        self.name,
                        key.key,
                        down.name,
                    )
                down.after = "(" + rows[-1]["message_id"]
                down.claimed += len(rows)
                self._key_stats[key.key].claimed += len(rows)
                await self._take(key, rows, 0)
            if len(rows) < batch:
                self._down.remove(down)
                if down.claimed:
                    self.log.info(
                        "group %s: claimed %d pending entr%s of %s from consumer %s (down)",
                        self.name,
                        down.claimed,
                        "y" if down.claimed == 1 else "ies",
                        key.key,
                        down.name,
                    )

    async def autoclaim(self) -> bool:
        """XAUTOCLAIM what we have room for; True if it found some (claim again soon).

        Taking no more than the free capacity keeps claimed entries from idling in our
        backlog until yet another consumer claims them; the cursor is kept per key so a
        long PEL is walked through rather than rescanned from its start each time.
        """
        idle = int(self.spec.retry.claim_idle * 1000)
        more = False
        for key in self.keys:
            capacity = self._capacity()
            if capacity == 0:
                return True
            cursor = self._autoclaim_cursor.get(key.key, "0-0")
            reply = await self.client.xautoclaim(
                key.key, self.name, self.me, idle, cursor, count=capacity
            )
            self._autoclaim_cursor[key.key] = reply[0]
            # Redis 6.2 replies [cursor, entries], a deleted entry as a nil without its ID
            # (the next retry round finds and acknowledges it); 7.x adds the deleted IDs.
            claimed = [
                c for c in reply[1] if c[0] is not None and (key.key, c[0]) not in self._inflight
            ]
            if not claimed:
                continue
            more = True
            ids = [c[0] for c in claimed]
            rows = await self.client.xpending_range(
                key.key, self.name, ids[0], ids[-1], len(ids) * 2 + 10, consumername=self.me
            )
            counts = {r["message_id"]: int(r["times_delivered"]) - 1 for r in rows}
            self._key_stats[key.key].claimed += len(claimed)
            self.log.info(
                "group %s: claimed %d entr%s of %s idle over %gs",
                self.name,
                len(claimed),
                "y" if len(claimed) == 1 else "ies",
                key.key,
                self.spec.retry.claim_idle,
            )
            await self._process(reply_entries(key, claimed, counts))
        return more

    # -- claiming ----------------------------------------------------------------------

    async def _take(self, key: StreamKey, rows: list[dict[str, Any]], min_idle: int) -> None:
        """XCLAIM ``rows`` (XPENDING rows) to this consumer and process them."""
        rows = [r for r in rows if (key.key, r["message_id"]) not in self._inflight]
        if not rows:
            return
        counts = {r["message_id"]: int(r["times_delivered"]) for r in rows}
        claimed = await self.client.xclaim(
            key.key, self.name, self.me, min_idle_time=min_idle, message_ids=list(counts)
        )
        entries = reply_entries(key, claimed, counts)
        returned = {e.id for e in entries}
        missing = [i for i in counts if i not in returned]
        if missing:
            await self._ack_deleted(key, missing)
        await self._process(entries)

    async def _ack_deleted(self, key: StreamKey, missing: list[str]) -> None:
        """Acknowledge pending IDs XCLAIM gave us without an entry: trimmed or deleted.

        Redis 7 drops such IDs from the PEL itself; 6.2 moves them to us with a nil that
        names no ID. An ID that is not ours now was not claimed at all (another consumer
        took it meanwhile): it is left alone.
        """
        rows = await self.client.xpending_range(
            key.key, self.name, missing[0], missing[-1], len(missing) * 2 + 10, consumername=self.me
        )
        mine = {r["message_id"] for r in rows}
        gone = [i for i in missing if i in mine and (key.key, i) not in self._inflight]
        if gone:
            self.log.warning(
                "group %s: %d pending entr%s of %s no longer exist (trimmed or "
                "deleted); acknowledging them",
                self.name,
                len(gone),
                "y" if len(gone) == 1 else "ies",
                key.key,
            )
            await self.client.xack(key.key, self.name, *gone)

    async def _process(self, entries: list[Entry]) -> None:
        """Run claimed entries; dead-letter those already delivered more than allowed."""
        if not entries:
            return
        dead = [e for e in entries if e.deliveries > self.max_deliveries]
        live = [e for e in entries if e.deliveries <= self.max_deliveries]
        if dead:
            # this claim is not a delivery to a handler: report the ones that were
            await self._commit(
                [
                    Outcome(
                        Entry(e.key, e.id, e.fields, e.deliveries - 1),
                        DEAD,
                        [],
                        f"delivered {e.deliveries - 1} times without being "
                        "acknowledged (its consumer crashed or timed out each time)",
                    )
                    for e in dead
                ]
            )
        if live:
            await self._dispatch(live)
