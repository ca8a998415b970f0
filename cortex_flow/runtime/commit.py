"""Applying outcomes to Redis: publishes, dead letters and XACKs, atomically where it can.

Publishes and the XACK of their source entry run in one server-side script
(:data:`COMMIT`) when their keys share a slot (always, on a single server): atomic
like MULTI/EXEC, one command per batch instead of one per publish, and unlike EXEC it
can leave an entry unacknowledged when Redis rejects one of its publishes (WRONGTYPE:
the target is not a stream). In a cluster, a source key whose targets live in other
slots publishes first and acknowledges after: a crash in between delivers the message
again, it never loses it; an entry one of whose publishes Redis refused is acknowledged
only once dead-lettered, else it stays pending for a retry. Where scripts cannot run at
all, MULTI/EXEC is the fallback; a passing refusal (OOM, BUSY, ...) is raised instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.flow.durations import format_duration
from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.topology import ResolvedGroup
from cortex_flow.runtime.delivery import (
    ACK,
    DEAD,
    RETRY,
    Outcome,
    backoff_ms,
    scripting_unavailable,
)
from cortex_flow.runtime.routes import Publish
from cortex_flow.runtime.stats import KeyStats
from cortex_flow.wire.connection import same_slot
from cortex_flow.wire.deadletters import FAILURES_TTL, dead_letter_fields, failures_key
from cortex_flow.wire.faults import passing_reason

# ARGV[1] is the group, ARGV[2] the batch as one flat JSON array (one argument:
# packing thousands of small arguments costs the client more than the work itself;
# flat: decoding one table is cheaper for Redis than a table per entry and publish).
# Per entry: source key index, entry id, publish count; per publish: target key index,
# field count, then the fields and values (publishes never trim: retention does). KEYS
# holds every key once.
# An entry is acknowledged only when all its publishes succeeded; the reply lists the
# others as {entry number, key refused, error}.
COMMIT = """
local group = ARGV[1]
local b = cjson.decode(ARGV[2])
local failed, acks = {}, {}
local i, e, n = 1, 0, #b
while i <= n do
  e = e + 1
  local src, id, publishes = KEYS[b[i]], b[i + 1], b[i + 2]
  i = i + 3
  local err, bad = nil, nil
  for _ = 1, publishes do
    local key, count = KEYS[b[i]], b[i + 1]
    local first, last = i + 2, i + 1 + count
    i = last + 1
    if err == nil then
      local r = redis.pcall('XADD', key, '*', unpack(b, first, last))
      if type(r) == 'table' and r.err then err = r.err; bad = key end
    end
  end
  if err == nil then
    local list = acks[src]
    if list == nil then list = {}; acks[src] = list end
    list[#list + 1] = id
  else
    failed[#failed + 1] = {e, bad, err}
  end
end
for src, ids in pairs(acks) do
  for from = 1, #ids, 1000 do
    redis.call('XACK', src, group, unpack(ids, from, math.min(from + 999, #ids)))
  end
end
return failed
"""


# what a commit could not apply for a passing reason, with the error: (outcome, error)
Deferred = list[tuple[Outcome, str]]


class CommitDeferred(Exception):
    """Redis refused part of a commit for a passing reason (out of memory, read-only,
    loading, ...): ``outcomes`` were neither applied nor failed; commit them again later.
    Everything else of the batch was applied."""

    def __init__(self, outcomes: list[Outcome], reason: str, error: str) -> None:
        super().__init__(f"{len(outcomes)} outcome(s) not committed: {error}")
        self.outcomes = outcomes
        self.reason = reason
        self.error = error


class Committer:
    """Commits one group's outcomes and counts and logs what became of each entry."""

    def __init__(
        self,
        client: Any,
        group: ResolvedGroup,
        streams: Mapping[str, StreamSpec],
        key_stats: Mapping[str, KeyStats],
        *,
        cluster: bool,
        log: logging.Logger,
        stuck: set[tuple[str, str]] | None = None,
    ) -> None:
        self.client = client
        self.name = group.name
        self.dead_letter_key = group.dead_letter
        self.max_deliveries = group.spec.retry.max_deliveries
        self._backoff = group.spec.retry.backoff
        self.cluster = cluster
        self.log = log
        self._key_stats = key_stats
        # (key, id) of entries reported as failed for good with no dead_letter to go to;
        # shared with PendingWork, which stops claiming them
        self.stuck = stuck if stuck is not None else set()
        self._script: Any = client.register_script(COMMIT)

    def dead_letter(self, outcome: Outcome) -> Publish:
        """The dead-letter entry for ``outcome``: its fields plus the ``dlq_*`` metadata."""
        entry = outcome.entry
        fields = dead_letter_fields(
            entry.fields, entry.key.key, entry.id, self.name, entry.deliveries, outcome.error
        )
        assert self.dead_letter_key is not None
        return Publish(self.dead_letter_key, fields)

    async def commit(self, outcomes: list[Outcome]) -> None:
        """Apply a batch of outcomes: publishes, dead letters and XACKs together.

        A RETRY is only counted and logged: its entry stays pending until the backoff
        for its delivery count has passed. A passing refusal of the whole batch (no
        answer, out of memory, ...) is raised as it came; of some of its entries, as
        :class:`CommitDeferred` once the rest is applied. Either way nothing of what was
        not applied is counted: commit those outcomes again.
        """
        # refused for a passing reason: (outcome, error); one list per call, as the
        # flusher and the consumer's claims may commit at the same time
        deferred: list[tuple[Outcome, str]] = []
        await self._commit(outcomes, deferred)
        counted: list[Outcome] = []  # failed, or done after more than one delivery
        for outcome in outcomes:
            if outcome.kind == RETRY:
                self._retrying(outcome)
                counted.append(outcome)
            elif outcome.entry.deliveries > 1:
                counted.append(outcome)
        if counted:
            await self._count_failures(counted, {id(o) for o, _ in deferred})
        if deferred:
            error = deferred[0][1]
            refused = [o for o, _ in deferred]
            raise CommitDeferred(refused, passing_reason(error) or "refused", error)

    async def _count_failures(self, outcomes: list[Outcome], deferred: set[int]) -> None:
        """Count failed deliveries per entry (:func:`failures_key`), forgotten once the
        entry is done: a dead letter after crashes then says how many runners died
        holding it. Only retried entries come here; a Redis error only costs the count."""
        pipe = self.client.pipeline(transaction=False)
        for outcome in outcomes:
            if id(outcome) in deferred:
                continue
            entry = outcome.entry
            key, field = failures_key(entry.key.key), f"{self.name}:{entry.id}"
            if outcome.kind == RETRY:
                pipe.hincrby(key, field, 1)
                pipe.expire(key, FAILURES_TTL)
            else:
                pipe.hdel(key, field)
        try:
            await pipe.execute()
        except Exception as exc:  # bookkeeping: never a reason to redo the commit
            self.log.debug("group %s: failure counts not updated: %s", self.name, exc)

    def _retrying(self, outcome: Outcome) -> None:
        entry = outcome.entry
        self._key_stats[entry.key.key].failed += 1
        self.log.warning(
            "group %s: %s from %s failed (delivery %d of %d): %s; will retry in %s",
            self.name,
            entry.id,
            entry.key.key,
            entry.deliveries,
            self.max_deliveries,
            outcome.error,
            format_duration(backoff_ms(self._backoff, entry.deliveries) / 1000),
        )

    async def _commit(self, outcomes: list[Outcome], deferred: Deferred) -> None:
        if all(o.kind == ACK and not o.publishes for o in outcomes):
            await self._ack_only(outcomes)
            return
        acks: dict[str, list[str]] = {}
        adds: list[tuple[Outcome, Publish]] = []
        done: list[Outcome] = []
        for outcome in outcomes:
            entry = outcome.entry
            source = entry.key.key
            if outcome.kind == RETRY:
                continue
            if outcome.kind == DEAD:
                if self.dead_letter_key is None:
                    self._stuck(outcome)
                    continue
                adds.append((outcome, self.dead_letter(outcome)))
            else:
                adds.extend((outcome, p) for p in outcome.publishes)
            acks.setdefault(source, []).append(entry.id)
            done.append(outcome)
        if not acks:
            return
        if not adds:
            await self._xack(acks)
        elif not self.cluster:
            if self._script is not None:
                rejected = await self._run_script(done, deferred)
                done = [o for o in done if id(o) not in rejected]
            else:
                pipe = self.client.pipeline(transaction=True)
                for _, p in adds:
                    pipe.xadd(p.key, p.fields)
                for key, ids in acks.items():
                    pipe.xack(key, self.name, *ids)
                results = await pipe.execute(raise_on_error=False)
                lost, _ = await self._rescue(adds, results, deferred)
                done = [o for o in done if id(o) not in lost]
        else:
            lost = await self._commit_cluster(adds, acks, done, deferred)
            done = [o for o in done if id(o) not in lost]
        for outcome in done:
            stats = self._key_stats[outcome.entry.key.key]
            if outcome.kind == DEAD:
                stats.dead_lettered += 1
                stats.failed += outcome.attempt_failed  # the last failed try counts too
                self.log.warning(
                    "group %s: %s from %s dead-lettered to %s after %d deliver%s: %s",
                    self.name,
                    outcome.entry.id,
                    outcome.entry.key.key,
                    self.dead_letter_key,
                    outcome.entry.deliveries,
                    "y" if outcome.entry.deliveries == 1 else "ies",
                    outcome.error,
                )
            else:
                stats.processed += 1
            if outcome.entry.deliveries > 1:
                stats.retried += 1

    async def _ack_only(self, outcomes: list[Outcome]) -> None:
        """The common batch: acknowledgements and nothing to publish; counted per key."""
        acks: dict[str, list[str]] = {}
        for outcome in outcomes:
            entry = outcome.entry
            ids = acks.get(entry.key.key)
            if ids is None:
                ids = acks[entry.key.key] = []
            ids.append(entry.id)
        await self._xack(acks)
        for key, ids in acks.items():
            self._key_stats[key].processed += len(ids)
        for outcome in outcomes:
            if outcome.entry.deliveries > 1:
                self._key_stats[outcome.entry.key.key].retried += 1

    async def _xack(self, acks: dict[str, list[str]]) -> None:
        """XACK ``acks`` (key: ids): one command, or one pipeline for several keys."""
        if len(acks) == 1:
            key, ids = next(iter(acks.items()))
            await self.client.xack(key, self.name, *ids)
            return
        pipe = self.client.pipeline(transaction=False)
        for key, ids in acks.items():
            pipe.xack(key, self.name, *ids)
        await pipe.execute()

    def _stuck(self, outcome: Outcome) -> None:
        """Report an entry that failed for good with no dead_letter: it stays pending."""
        entry = outcome.entry
        source = entry.key.key
        self._key_stats[source].failed += outcome.attempt_failed
        if (source, entry.id) not in self.stuck:
            if len(self.stuck) >= 100_000:
                self.stuck.clear()  # a bound, not a cache: at worst some are reported again
            self.stuck.add((source, entry.id))
            self._key_stats[source].stuck += 1
        self.log.error(
            "group %s: %s from %s failed for good (%s) and the group has no dead_letter; it "
            "stays pending and this runner no longer retries it. Add dead_letter: to the group",
            self.name,
            entry.id,
            source,
            outcome.error,
        )

    def _publishes(self, outcome: Outcome) -> list[Publish]:
        return [self.dead_letter(outcome)] if outcome.kind == DEAD else outcome.publishes

    async def _run_script(self, outcomes: list[Outcome], deferred: Deferred) -> set[int]:
        """Commit with :data:`COMMIT`; entries whose publish was refused are dead-lettered.

        Returns ``id()`` of the outcomes not committed as they were (dead-lettered now,
        or left pending when even that failed).
        """
        index: dict[str, int] = {}
        batch: list[Any] = []
        add = batch.append
        for outcome in outcomes:
            publishes = self._publishes(outcome)
            batch += (
                index.setdefault(outcome.entry.key.key, len(index) + 1),
                outcome.entry.id,
                len(publishes),
            )
            for p in publishes:
                fields = p.fields
                add(index.setdefault(p.key, len(index) + 1))
                add(2 * len(fields))
                for pair in fields.items():
                    batch += pair
        args = [self.name, json.dumps(batch, ensure_ascii=False, separators=(",", ":"))]
        try:
            failed = await self._script(keys=list(index), args=args)
        except ResponseError as exc:
            if not scripting_unavailable(exc):
                raise  # NOGROUP, OOM, BUSY, ...: the consumer loop backs off and tries again
            # a server without scripting: plain commands from now on
            self.log.warning(
                "group %s: the commit script cannot run (%s); publishes are now committed with %s",
                self.name,
                exc,
                "publish-then-ack (a crash in between delivers again)"
                if self.cluster
                else "MULTI/EXEC",
            )
            self._script = None
            await self._commit(outcomes, deferred)
            return {id(o) for o in outcomes}
        if not failed:
            return set()
        rejected: set[int] = set()
        retry: list[Outcome] = []
        for number, key, error in failed:
            outcome = outcomes[int(number) - 1]
            rejected.add(id(outcome))
            if passing_reason(str(error)) is not None:
                deferred.append((outcome, str(error)))  # OOM, READONLY, ...: not its fault
                continue
            reason = f"publishing to {key} failed: {error}"
            fate = "it stays pending"
            if outcome.kind != DEAD and self.dead_letter_key is not None:
                retry.append(Outcome(outcome.entry, DEAD, [], reason))
                fate = "dead-lettering it"
            self.log.error(
                "group %s: %s from %s: %s; %s",
                self.name,
                outcome.entry.id,
                outcome.entry.key.key,
                reason,
                fate,
            )
        if retry:
            await self._commit(retry, deferred)
        return rejected

    async def _commit_cluster(
        self,
        adds: list[tuple[Outcome, Publish]],
        acks: dict[str, list[str]],
        done: list[Outcome],
        deferred: Deferred,
    ) -> set[int]:
        """Cluster: atomic per source key where targets share its slot, else add then ack.

        Publishing first, a crash before the XACK duplicates, never loses. An entry one of
        whose publishes Redis refused is acknowledged once dead-lettered, else left pending
        (its retry may publish the others again: at least once).
        """
        lost: set[int] = set()
        for source, ids in acks.items():
            mine = [(o, p) for o, p in adds if o.entry.key.key == source]
            if same_slot(source, *[p.key for _, p in mine]) and self._script is not None:
                lost |= await self._run_script(
                    [o for o in done if o.entry.key.key == source], deferred
                )
                continue
            if mine:
                pipe = self.client.pipeline(transaction=False)
                for _, p in mine:
                    pipe.xadd(p.key, p.fields)
                results = await pipe.execute(raise_on_error=False)
                failed, unsaved = await self._rescue(mine, results, deferred, acked=False)
                lost |= failed
                if unsaved:
                    keep = {o.entry.id for o, _ in mine if id(o) in unsaved}
                    ids = [i for i in ids if i not in keep]
            if ids:
                await self.client.xack(source, self.name, *ids)
        return lost

    async def _rescue(
        self,
        adds: list[tuple[Outcome, Publish]],
        results: list[Any],
        deferred: Deferred,
        *,
        acked: bool = True,
    ) -> tuple[set[int], set[int]]:
        """Dead-letter entries one of whose publishes Redis rejected.

        Inside an applied MULTI/EXEC (``acked``), EXEC does not roll back: a command failing
        at run time (WRONGTYPE: the target key is not a stream) leaves the rest applied, the
        entry's XACK included. Rather than lose the message, send it to the dead-letter
        stream now, or log its fields. Publishing before acknowledging (a cluster), an
        entry that cannot be dead-lettered is not acknowledged: it stays pending.

        Returns ``id()`` of the outcomes concerned, and of those neither published nor
        dead-lettered.
        """
        failed = [
            (o, p, r) for (o, p), r in zip(adds, results, strict=False) if isinstance(r, Exception)
        ]
        rescued: set[int] = set()
        unsaved: set[int] = set()
        for outcome, publish, exc in failed:
            if id(outcome) in rescued:
                continue
            rescued.add(id(outcome))
            entry = outcome.entry
            reason = str(exc).rpartition("caused error: ")[2].strip("(),'\"")
            if not acked and passing_reason(exc) is not None:
                unsaved.add(id(outcome))  # not acknowledged: committed again later
                deferred.append((outcome, reason))
                continue
            error = f"publishing to {publish.key} failed: {reason}"
            dlq = self.dead_letter_key
            if dlq is not None and publish.key != dlq:
                dead = self.dead_letter(Outcome(entry, DEAD, [], error))
                try:
                    await self.client.xadd(dead.key, dead.fields)
                except Exception as again:
                    error += f"; dead-lettering failed too: {again}"
                else:
                    self._key_stats[entry.key.key].dead_lettered += 1
                    self.log.error(
                        "group %s: %s from %s: %s%s; dead-lettered to %s",
                        self.name,
                        entry.id,
                        entry.key.key,
                        "acknowledged but " if acked else "",
                        error,
                        dlq,
                    )
                    continue
            unsaved.add(id(outcome))
            if not acked:
                self.log.error(
                    "group %s: %s from %s: %s; it stays pending and is retried%s",
                    self.name,
                    entry.id,
                    entry.key.key,
                    error,
                    "" if dlq is not None else " (the group has no dead_letter)",
                )
                continue
            self.log.error(
                "group %s: %s from %s was acknowledged but %s; its fields, to send again by "
                "hand: %s",
                self.name,
                entry.id,
                entry.key.key,
                error,
                json.dumps(entry.fields),
            )
        return rescued, unsaved
