"""Entries delivered but not acknowledged, and how a consumer takes them back.

Four ways, all listing entries with XPENDING, then XCLAIM to this consumer and the
same path as a fresh read, with ``deliveries`` from the delivery count XPENDING gave
for that very entry:

- its own pending entries, at start and after a lost connection (a previous run, or
  what it held when the connection dropped), one at a time (see below);
- its failed entries, when the backoff for their delivery count is due (the consumer
  keeps the due times: :meth:`PendingWork.take`);
- any consumer's entries idle past ``claim_idle`` (XPENDING IDLE), a crashed runner's;
- the entries of consumers whose runner or agent went down, without waiting.

What a runner held when it died (ours from before a restart, a down consumer's, entries
idle past ``claim_idle``) may hold the message that killed it. Such entries are taken
back one at a time, alongside new work: the next is claimed once the last is committed,
so a message that kills every runner it meets never takes the same neighbours with it
twice. Idle entries are first moved to this consumer with XCLAIM JUSTID (no delivery
counted), then each is claimed (counted) just before it runs.

An entry claimed once more than ``max_deliveries`` allows is dead-lettered without
running it, saying how many runners died holding it (failed deliveries are counted
apart, see :func:`cortex_flow.wire.deadletters.failures_key`). In a group with no
dead_letter, an entry that failed for good (or used up its deliveries) stays pending
and is no longer claimed: reported once, counted as ``stuck``. An entry deleted or
trimmed from the stream while pending is acknowledged.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cortex_flow.flow.topology import ResolvedGroup, StreamKey
from cortex_flow.runtime.delivery import DEAD, Entry, Outcome, backoff_ms, pairs
from cortex_flow.runtime.stats import KeyStats
from cortex_flow.wire.deadletters import crash_reason, failures_key


@dataclass(slots=True)
class _DownConsumer:
    """The pending entries of ``name`` on ``key`` still to claim; its runner is down."""

    key: StreamKey
    name: str
    min_idle: int = 0  # XCLAIM's min-idle (ms): what another runner claimed first is skipped
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
        # idle entries moved to us (XCLAIM JUSTID), to take one at a time
        self._idle: deque[tuple[StreamKey, str]] = deque()
        # the entry taken back from a dead runner that runs now: the next waits for it
        self._suspect: tuple[str, str] | None = None

    def backoff_ms(self, deliveries: int) -> int:
        """How long an entry delivered ``deliveries`` times waits before the next try."""
        return backoff_ms(self.spec.retry.backoff, deliveries)

    # -- own pending -------------------------------------------------------------------

    def recover(self) -> None:
        """Take back every entry pending under our name (at start, after a lost connection).

        :meth:`take_own` does it, a page at a time, while :attr:`recovering`.
        """
        self._own = {key.key: "-" for key in self.keys}
        self._idle.clear()  # moved to us: taken back with the rest of ours

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
                room = self._room()
                if room == 0:
                    return
                rows, following = await self._page(key, self._own[key.key], room, self.me)
                if following is None:
                    del self._own[key.key]
                else:
                    self._own[key.key] = following
                if rows:
                    await self.take(key, rows, 0, suspect=True)

    def _room(self) -> int:
        """How many entries taken back from a dead runner may start now: one, once the
        last one is committed and a slot is free."""
        if self._suspect is not None and self._suspect in self._inflight:
            return 0
        self._suspect = None
        return min(1, self._capacity())

    @property
    def isolating(self) -> bool:
        """True while entries a dead runner held remain to be taken back, one at a time."""
        return bool(self._own or self._down or self._idle)

    # -- other consumers' pending ------------------------------------------------------

    def request_claim(self, consumers: Iterable[str], min_idle: int = 0) -> None:
        """Claim the pending entries of ``consumers`` (their runner or agent is down).

        Each XCLAIM asks for ``min_idle`` ms of idle time: the owner's silence, so an
        entry another runner claimed a moment before (its idle time starts again) is
        left to it.
        """
        names = sorted(set(consumers) - {self.me})
        queued = {(d.key.key, d.name): d for d in self._down}
        for key in self.keys:
            for name in names:
                down = queued.get((key.key, name))
                if down is None:
                    self._down.append(_DownConsumer(key, name, min_idle))
                else:
                    down.after = "-"  # down again: it may have read older entries meanwhile
                    down.min_idle = min_idle

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
        for down in list(self._down):
            room = self._room()
            if room == 0:
                return
            key = down.key
            rows, following = await self._page(key, down.after, room, down.name)
            if rows:
                if down.claimed == 0:
                    self.log.info(
                        "group %s: claiming the pending entries of %s from consumer %s (down)",
                        self.name,
                        key.key,
                        down.name,
                    )
                down.after = "(" + rows[-1]["message_id"]
                down.claimed += await self.take(
                    key, rows, down.min_idle, claiming=True, suspect=True
                )
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
        """Take entries idle past ``claim_idle`` (their runner died or stalled).

        XPENDING IDLE lists them a page (``batch``) at a time, each key's scan going on
        from where it stopped; XCLAIM JUSTID moves them to this consumer without counting
        a delivery (only those still idle: another consumer may have taken some); then
        each is claimed and run alone (:meth:`_take_idle`). Returns True to look again
        soon.
        """
        if self._idle:
            await self._take_idle()
            return True
        idle = int(self.spec.retry.claim_idle * 1000)
        page = self.spec.batch
        more = False
        for key in self.keys:
            start = self._claim_from.get(key.key, "-")
            rows: list[dict[str, Any]] = await self.client.xpending_range(
                key.key, self.name, start, "+", page, idle=idle
            )
            self._claim_from[key.key] = "(" + rows[-1]["message_id"] if len(rows) == page else "-"
            more = more or len(rows) == page  # the rest of the list, next time round
            rows = [
                r
                for r in rows
                if (key.key, r["message_id"]) not in self._inflight
                and (self._has_dead_letter or not self._given_up(key, r))
            ]
            if not rows:
                continue
            moved = await self.client.xclaim(
                key.key,
                self.name,
                self.me,
                min_idle_time=idle,
                message_ids=[r["message_id"] for r in rows],
                justid=True,
            )
            if not moved:
                continue
            self._idle.extend((key, str(i)) for i in moved)
            self._key_stats[key.key].claimed += len(moved)
            self.log.info(
                "group %s: claimed %d entr%s of %s idle over %gs; each runs alone",
                self.name,
                len(moved),
                "y" if len(moved) == 1 else "ies",
                key.key,
                self.spec.retry.claim_idle,
            )
        if self._idle:
            await self._take_idle()
            return True
        return more

    async def _take_idle(self) -> None:
        """Claim (a delivery) and run the next idle entry moved to us, if it may start."""
        while self._idle and self._room():
            key, entry_id = self._idle.popleft()
            counts = await self._counts(key, [entry_id])
            if entry_id not in counts:
                continue  # acknowledged, or taken over by another consumer meanwhile
            row = {"message_id": entry_id, "times_delivered": counts[entry_id]}
            await self.take(key, [row], 0, suspect=True)

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
        suspect: bool = False,
    ) -> int:
        """XCLAIM ``rows`` (XPENDING rows) to this consumer and process them; how many.

        ``claiming``: they were another consumer's (or idle past ``claim_idle``): counted.
        ``listed``: the rows come from XPENDING just now, so an ID XCLAIM does not return
        was trimmed or deleted; not listed (a retry's due time), it may simply have been
        taken or acknowledged meanwhile, and is left alone. ``suspect``: one entry a dead
        runner held; the next such entry waits until it is committed.
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
        live = await self._process(entries)
        if suspect and live:
            self._suspect = (key.key, live[-1].id)
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

    async def _failures(self, entries: list[Entry]) -> dict[str, int]:
        """How many deliveries of each of ``entries`` failed (the rest: its runner died)."""
        pipe = self.client.pipeline(transaction=False)
        for e in entries:
            pipe.hget(failures_key(e.key.key), f"{self.name}:{e.id}")
        try:
            found = await pipe.execute()
        except Exception as exc:  # the count is for the reason only
            self.log.debug("group %s: failure counts not read: %s", self.name, exc)
            return {}
        return {e.id: int(n) for e, n in zip(entries, found, strict=True) if n}

    async def _process(self, entries: list[Entry]) -> list[Entry]:
        """Run claimed entries; dead-letter those already delivered more than allowed.
        Returns those that run."""
        if not entries:
            return []
        dead = [e for e in entries if e.deliveries > self.max_deliveries]
        live = [e for e in entries if e.deliveries <= self.max_deliveries]
        if dead:
            # this claim is not a delivery to a handler: report the ones that were
            failures = await self._failures(dead)
            await self._commit(
                [
                    Outcome(
                        Entry(e.key, e.id, e.fields, e.deliveries - 1),
                        DEAD,
                        [],
                        crash_reason(e.deliveries - 1, failures.get(e.id, 0)),
                    )
                    for e in dead
                ]
            )
        if live:
            await self._dispatch(live)
        return live
