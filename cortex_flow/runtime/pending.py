"""Entries delivered but not acknowledged, and how a consumer takes them back.

Four ways, all listing entries with XPENDING, then XCLAIM to this consumer and the
same path as a fresh read, with ``deliveries`` from the delivery count XPENDING gave
for that very entry:

- its own pending entries, at start and after a lost connection (a previous run, or
  what it held when the connection dropped), a page at a time as slots free up;
- its failed entries, when the backoff for their delivery count is due (the consumer
  keeps the due times: :meth:`PendingWork.take`);
- any consumer's entries idle past ``claim_idle`` (XPENDING IDLE), a crashed runner's;
- the entries of consumers whose runner or agent went down, without waiting.

An entry claimed once more than ``max_deliveries`` allows is dead-lettered without
running it: each delivery so far crashed or timed out its consumer. In a group with no
dead_letter, an entry that failed for good (or used up its deliveries) stays pending
and is no longer claimed: reported once, counted as ``stuck``. An entry deleted or
trimmed from the stream while pending is acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cortex_flow.flow.topology import ResolvedGroup, StreamKey
from cortex_flow.runtime.delivery import DEAD, Entry, Outcome, backoff_ms, pairs
from cortex_flow.runtime.stats import KeyStats


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
    """Entries of ``key`` in an XREADGROUP or XCLAIM reply.

    ``counts``: each entry's deliveries before this one, for every ID asked for (a claim);
    not given, a fresh read: the first delivery.
    """
    if not items:
        return []
    if counts is None and isinstance(items[0][1], dict):  # a fresh read: the usual case
        return [Entry(key, i, f, 1) for i, f in items if i is not None and f is not None]
    entries = []
    for item in items:
        entry_id, fields = item[0], item[1]
        if entry_id is None or fields is None:  # deleted (Redis 6.2 sends a nil)
            continue
        if isinstance(fields, list):
            fields = pairs(fields)
        deliveries = 1 if counts is None else counts[entry_id] + 1
        entries.append(Entry(key, entry_id, fields, deliveries))
    return entries


class PendingWork:
    """Takes back one consumer's share of its group's pending entries.

    ``inflight`` is the consumer's own set of (key, id) it holds: never claimed again.
    ``stuck`` (shared with the committer) holds the (key, id) that failed for good in a
    group with no dead_letter: not claimed again either. ``capacity()`` is how many more
    entries it can start now; ``dispatch`` hands it entries to run (beyond its free slots
    they wait in its backlog), ``commit`` applies outcomes.
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
        stuck: set[tuple[str, str]] | None = None,
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
        self._has_dead_letter = group.dead_letter is not None
        self._stuck = stuck if stuck is not None else set()
        self._capacity = capacity
        self._dispatch = dispatch
        self._commit = commit
        self._claim_from: dict[str, str] = {}
        self._own: dict[str, str] = {}
        self._down: list[_DownConsumer] = []

    def backoff_ms(self, deliveries: int) -> int:
        """How long an entry delivered ``deliveries`` times waits before the next try."""
        return backoff_ms(self.spec.retry.backoff, deliveries)

    # -- own pending -------------------------------------------------------------------

    def recover(self) -> None:
        """Take back every entry pending under our name (at start, after a lost connection).

        :meth:`take_own` does it, a page at a time, while :attr:`recovering`.
        """
        self._own = {key.key: "-" for key in self.keys}

    async def _page(
        self, key: StreamKey, after: str, count: int, consumer: str, idle: int | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One XPENDING page of ``consumer``'s entries from ``after`` on, and where the next
        page starts (None: this was the last page)."""
        rows: list[dict[str, Any]] = await self.client.xpending_range(
            key.key, self.name, after, "+", count, consumername=consumer, idle=idle
        )
        following = "(" + rows[-1]["message_id"] if len(rows) == count else None
        return rows, following

    @property
    def recovering(self) -> bool:
        """True while entries pending under our name remain to be taken back."""
        return bool(self._own)

    async def take_own(self) -> None:
        """Take back our pending entries, whatever their idle time, as many as we have room for.

        Like :meth:`claim_from_down`, a page is claimed only while a slot is free: after a
        crash under load the list can be long, and entries claimed long before they can
        start would idle in the backlog past ``claim_idle`` and be claimed by another
        consumer. Called again while :attr:`recovering`; the scan of each key goes on from
        where it stopped.
        """
        for key in self.keys:
            while key.key in self._own:
                room = self._capacity()
                if room == 0:
                    return
                rows, following = await self._page(key, self._own[key.key], room, self.me)
                if following is None:
                    del self._own[key.key]
                else:
                    self._own[key.key] = following
                if rows:
                    await self.take(key, rows, 0)

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
            rows, following = await self._page(key, down.after, batch, down.name)
            if rows:
                if down.claimed == 0:
                    self.log.info(
                        "group %s: claiming the pending entries of %s from consumer %s (down)",
                        self.name,
                        key.key,
                        down.name,
                    )
                down.after = "(" + rows[-1]["message_id"]
                down.claimed += await self.take(key, rows, 0, claiming=True)
            if following is None:
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
        """XAUTOCLAIM entries idle past ``claim_idle``, as many as we have room for.

        Returns True to look again soon (the scan goes on per key from XAUTOCLAIM's
        cursor, so a long PEL is walked through rather than rescanned). Redis 6.2 replies
        ``[cursor, entries]``, 7.x adds the IDs it found deleted (and dropped from the
        PEL itself); 6.2 shows a deleted entry as a nil, acknowledged here. Each claimed
        entry's delivery count is then looked up by its own ID (XPENDING id id 1, in one
        pipeline), never guessed. Taking no more than the free capacity keeps claimed
        entries from idling in our backlog until yet another consumer claims them.
        """
        idle = int(self.spec.retry.claim_idle * 1000)
        more = False
        for key in self.keys:
            room = self._capacity()
            if room == 0:
                return True
            cursor = self._claim_from.get(key.key, "0-0")
            reply = await self.client.xautoclaim(
                key.key, self.name, self.me, idle, cursor, count=room
            )
            cursor = str(reply[0])
            self._claim_from[key.key] = cursor
            if cursor != "0-0":
                more = True  # the rest of the list, next time round
            items = [i for i in reply[1] if i and i[0] is not None and i[1] is not None]
            if len(items) < len(reply[1]):  # 6.2: a nil for an entry deleted meanwhile
                await self._ack_deleted_pending(key)
            items = [i for i in items if (key.key, i[0]) not in self._inflight]
            if not items:
                continue
            more = True
            counts = await self._counts(key, [i[0] for i in items])
            items = [i for i in items if i[0] in counts]
            rows = [{"message_id": i, "times_delivered": n} for i, n in counts.items()]
            given_up = {
                r["message_id"]
                for r in rows
                if not self._has_dead_letter and self._given_up(key, r)
            }
            entries = reply_entries(
                key,
                [i for i in items if i[0] not in given_up],
                {i: n - 1 for i, n in counts.items()},  # the claim itself was a delivery
            )
            self._key_stats[key.key].claimed += len(entries)
            if entries:
                self.log.info(
                    "group %s: claimed %d entr%s of %s idle over %gs",
                    self.name,
                    len(entries),
                    "y" if len(entries) == 1 else "ies",
                    key.key,
                    self.spec.retry.claim_idle,
                )
                await self._process(entries)
        return more

    async def _counts(self, key: StreamKey, ids: list[str]) -> dict[str, int]:
        """Delivery counts of our own pending ``ids``, each looked up by itself."""
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(key.key, self.name, entry_id, entry_id, 1, consumername=self.me)
        counts = {}
        for rows in await pipe.execute():
            if rows:
                counts[rows[0]["message_id"]] = int(rows[0]["times_delivered"])
        return counts

    async def _ack_deleted_pending(self, key: StreamKey) -> None:
        """Redis 6.2: XAUTOCLAIM moved deleted entries to us as nils; acknowledge them.

        The nil names no ID, so our pending IDs are listed (XPENDING) and each looked up
        (XRANGE id id): those whose entry is gone are acknowledged.
        """
        rows = await self.client.xpending_range(
            key.key, self.name, "-", "+", 1000, consumername=self.me
        )
        ids = [r["message_id"] for r in rows if (key.key, r["message_id"]) not in self._inflight]
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(key.key, entry_id, entry_id, count=1)
        present = {found[0][0] for found in await pipe.execute() if found}
        missing = [i for i in ids if i not in present]
        if missing:
            await self._ack_deleted(key, missing)

    # -- claiming ----------------------------------------------------------------------

    def _given_up(self, key: StreamKey, row: dict[str, Any]) -> bool:
        """Whether a pending entry (an XPENDING row) is no longer claimed: no dead_letter.

        It failed for good (the committer reported it), or used up its deliveries: claimed
        again, it would only be found dead again with nowhere to go. Reported once.
        """
        ident = (key.key, row["message_id"])
        if ident in self._stuck:
            return True
        deliveries = int(row["times_delivered"])
        if deliveries < self.max_deliveries:
            return False
        if len(self._stuck) >= 100_000:
            self._stuck.clear()  # a bound, not a cache: at worst some are reported again
        self._stuck.add(ident)
        self._key_stats[key.key].stuck += 1
        self.log.error(
            "group %s: %s from %s was delivered %d time%s (max_deliveries %d) and the group "
            "has no dead_letter; it stays pending and this runner no longer claims it. Add "
            "dead_letter: to the group",
            self.name,
            row["message_id"],
            key.key,
            deliveries,
            "" if deliveries == 1 else "s",
            self.max_deliveries,
        )
        return True

    async def take(
        self,
        key: StreamKey,
        rows: list[dict[str, Any]],
        min_idle: int,
        *,
        claiming: bool = False,
        listed: bool = True,
    ) -> int:
        """XCLAIM ``rows`` (XPENDING rows) to this consumer and process them; how many.

        ``claiming``: they were another consumer's (or idle past ``claim_idle``): counted.
        ``listed``: the rows come from XPENDING just now, so an ID XCLAIM does not return
        was trimmed or deleted; not listed (a retry's due time), it may simply have been
        taken or acknowledged meanwhile, and is left alone.
        """
        rows = [
            r
            for r in rows
            if (key.key, r["message_id"]) not in self._inflight
            and (self._has_dead_letter or not self._given_up(key, r))
        ]
        if not rows:
            return 0
        counts = {r["message_id"]: int(r["times_delivered"]) for r in rows}
        claimed = await self.client.xclaim(
            key.key, self.name, self.me, min_idle_time=min_idle, message_ids=list(counts)
        )
        entries = reply_entries(key, claimed, counts)
        returned = {e.id for e in entries}
        missing = [i for i in counts if i not in returned]
        if missing and listed:
            await self._ack_deleted(key, missing)
        if claiming:
            self._key_stats[key.key].claimed += len(entries)
        await self._process(entries)
        return len(entries)

    async def _ack_deleted(self, key: StreamKey, missing: list[str]) -> None:
        """Acknowledge pending IDs XCLAIM gave us without an entry: trimmed or deleted.

        Redis 7 drops such IDs from the PEL itself; 6.2 moves them to us with a nil that
        names no ID. An ID that is not ours now was not claimed at all (another consumer
        took it meanwhile): it is left alone.
        """
        pipe = self.client.pipeline(transaction=False)
        for entry_id in missing:  # each looked up: a range could hold more of ours
            pipe.xpending_range(key.key, self.name, entry_id, entry_id, 1, consumername=self.me)
        mine = {rows[0]["message_id"] for rows in await pipe.execute() if rows}
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
