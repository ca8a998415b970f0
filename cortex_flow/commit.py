"""Applying outcomes to Redis: publishes, dead letters and XACKs, atomically where it can.

Publishes and the XACK of their source entry go in one MULTI/EXEC when their keys
share a slot (always, on a single server). In a cluster, a source key whose targets
live in other slots publishes first and acknowledges after: a crash in between
delivers the message again, it never loses it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cortex_flow.connection import same_slot
from cortex_flow.delivery import DEAD, RETRY, Outcome
from cortex_flow.models import StreamSpec
from cortex_flow.routes import Publish
from cortex_flow.stats import KeyStats
from cortex_flow.topology import ResolvedGroup


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
    ) -> None:
        self.client = client
        self.name = group.name
        self.dead_letter_key = group.dead_letter
        dlq = group.spec.dead_letter
        self._dlq_maxlen = streams[dlq].maxlen if dlq is not None and dlq in streams else None
        self.max_deliveries = group.spec.retry.max_deliveries
        self.cluster = cluster
        self.log = log
        self._key_stats = key_stats

    def dead_letter(self, outcome: Outcome) -> Publish:
        """The dead-letter entry for ``outcome``: its fields plus the ``dlq_*`` metadata."""
        entry = outcome.entry
        fields = dict(entry.fields)
        fields.update(
            dlq_stream=entry.key.key,
            dlq_id=entry.id,
            dlq_group=self.name,
            dlq_deliveries=str(entry.deliveries),
            dlq_error=outcome.error[:4000],
            dlq_at=_iso_now(),
        )
        assert self.dead_letter_key is not None
        return Publish(self.dead_letter_key, fields, self._dlq_maxlen)

    async def commit(self, outcomes: list[Outcome]) -> None:
        """Apply a batch of outcomes: publishes, dead letters and XACKs together.

        A RETRY is only counted and logged: its entry stays pending until the backoff
        for its delivery count has passed (see :mod:`cortex_flow.pending`).
        """
        acks: dict[str, list[str]] = {}
        adds: list[tuple[Outcome, Publish]] = []
        done: list[Outcome] = []
        for outcome in outcomes:
            entry = outcome.entry
            source = entry.key.key
            if outcome.kind == RETRY:
                self._key_stats[source].failed += 1
                self.log.warning(
                    "group %s: %s from %s failed (delivery %d of %d): %s; will retry",
                    self.name,
                    entry.id,
                    source,
                    entry.deliveries,
                    self.max_deliveries,
                    outcome.error,
                )
                continue
            if outcome.kind == DEAD:
                if self.dead_letter_key is None:
                    self.log.error(
                        "group %s: %s from %s failed for good (%s) and the group has no "
                        "dead_letter; it stays pending. Add dead_letter: to the group",
                        self.name,
                        entry.id,
                        source,
                        outcome.error,
                    )
                    continue
                adds.append((outcome, self.dead_letter(outcome)))
            else:
                adds.extend((outcome, p) for p in outcome.publishes)
            acks.setdefault(source, []).append(entry.id)
            done.append(outcome)
        if not acks:
            return
        if not adds:
            if len(acks) == 1:
                key, ids = next(iter(acks.items()))
                await self.client.xack(key, self.name, *ids)
            else:
                pipe = self.client.pipeline(transaction=False)
                for key, ids in acks.items():
                    pipe.xack(key, self.name, *ids)
                await pipe.execute()
        elif not self.cluster:
            pipe = self.client.pipeline(transaction=True)
            for _, p in adds:
                pipe.xadd(p.key, p.fields, maxlen=p.maxlen, approximate=True)
            for key, ids in acks.items():
                pipe.xack(key, self.name, *ids)
            results = await pipe.execute(raise_on_error=False)
            lost = await self._rescue(adds, results)
            done = [o for o in done if id(o) not in lost]
        else:
            lost = await self._commit_cluster(adds, acks)
            done = [o for o in done if id(o) not in lost]
        for outcome in done:
            stats = self._key_stats[outcome.entry.key.key]
            if outcome.kind == DEAD:
                stats.dead_lettered += 1
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

    async def _commit_cluster(
        self, adds: list[tuple[Outcome, Publish]], acks: dict[str, list[str]]
    ) -> set[int]:
        """Cluster: atomic per source key where targets share its slot, else add then ack."""
        lost: set[int] = set()
        for source, ids in acks.items():
            mine = [(o, p) for o, p in adds if o.entry.key.key == source]
            atomic = same_slot(source, *[p.key for _, p in mine])
            pipe = self.client.pipeline(transaction=atomic)
            for _, p in mine:
                pipe.xadd(p.key, p.fields, maxlen=p.maxlen, approximate=True)
            if atomic:
                pipe.xack(source, self.name, *ids)
                lost |= await self._rescue(mine, await pipe.execute(raise_on_error=False))
            else:
                await pipe.execute()  # publish first: a crash now duplicates, never loses
                await self.client.xack(source, self.name, *ids)
        return lost

    async def _rescue(self, adds: list[tuple[Outcome, Publish]], results: list[Any]) -> set[int]:
        """Dead-letter entries whose publish Redis rejected inside an applied MULTI/EXEC.

        EXEC does not roll back: a command failing at run time (WRONGTYPE: the target key
        is not a stream) leaves the rest applied, the entry's XACK included. Rather than
        lose the message, send it to the dead-letter stream now, or log its fields.
        Returns ``id()`` of the outcomes concerned.
        """
        failed = [
            (o, p, r) for (o, p), r in zip(adds, results, strict=False) if isinstance(r, Exception)
        ]
        rescued: set[int] = set()
        for outcome, publish, exc in failed:
            if id(outcome) in rescued:
                continue
            rescued.add(id(outcome))
            entry = outcome.entry
            reason = str(exc).rpartition("caused error: ")[2].strip("(),'\"")
            error = f"publishing to {publish.key} failed: {reason}"
            dlq = self.dead_letter_key
            if dlq is not None and publish.key != dlq:
                dead = self.dead_letter(Outcome(entry, DEAD, [], error))
                try:
                    await self.client.xadd(
                        dead.key, dead.fields, maxlen=dead.maxlen, approximate=True
                    )
                except Exception as again:
                    error += f"; dead-lettering failed too: {again}"
                else:
                    self._key_stats[entry.key.key].dead_lettered += 1
                    self.log.error(
                        "group %s: %s from %s was acknowledged but %s; dead-lettered to %s",
                        self.name,
                        entry.id,
                        entry.key.key,
                        error,
                        dlq,
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
        return rescued
