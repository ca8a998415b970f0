"""Reading one agent's inbox with its group's policy, the way a runner group reads.

:class:`InboxReader` serves :meth:`cortex_flow.Client.inbox`. It reads as one consumer of
a group the flows declare (``agents.X.inbox``, or a runner group on the agent's key):
its own pending entries first (after a restart), then new ones. A message whose handling
failed stays pending and is taken back (XCLAIM) once the backoff for its delivery count
has passed; entries idle past ``claim_idle`` in any consumer of the group (an agent
process that died) are claimed (XAUTOCLAIM). A failure on the ``max_deliveries``-th
delivery, or an entry claimed once more than that, goes to the group's dead-letter stream
with the ``dlq_*`` fields (:mod:`cortex_flow.wire.deadletters`), added and acknowledged
in one MULTI/EXEC where both keys share a slot. Without a ``dead_letter`` it stays
pending, logged, and this reader does not take it again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.durations import format_duration
from cortex_flow.flow.loader import Project
from cortex_flow.flow.topology import ResolvedGroup, resolve
from cortex_flow.ops.send import target_key
from cortex_flow.runtime.delivery import backoff_ms
from cortex_flow.wire.connection import is_cluster, same_slot
from cortex_flow.wire.deadletters import dead_letter_fields
from cortex_flow.wire.groups import ensure_group

__all__ = ["InboxEntry", "InboxReader", "reading_group"]

CLAIM_EVERY_MAX = 30.0  # seconds between two XAUTOCLAIM scans at most


def reading_group(
    project: Project, agent: str, stream: str = "inbox", group: str | None = None
) -> tuple[str, ResolvedGroup]:
    """The key and the declared group a client of ``agent`` reads on its key of ``stream``;
    never one that no flow declares (``status`` would not show it, ``plan`` would call it
    drift): ``agents.<agent>.inbox`` (its group, default the agent's name), else the runner
    group that reads the agent's key."""
    key, _ = target_key(project, stream, agent=agent)
    resolved = resolve(project.topology, agent)
    on_key = {g.name: g for g in resolved.groups.values() if key in {k.key for k in g.keys}}
    declared = project.topology.agents[agent].inbox
    if group is None and declared is not None and declared.stream == stream:
        group = declared.group or agent
    if group is None and on_key:
        group = sorted(on_key)[0]  # a runner group on the agent's key: shared with it
    if group is None or group not in on_key:
        what = f"group {group} does not read" if group else "no declared group reads"
        raise CortexFlowError(
            f"agent {agent}: {what} its inbox {key}; declare the group its client reads "
            f"in the flows, e.g. agents: {{{agent}: {{inbox: {{dead_letter: dlq}}}}}}"
        )
    return key, on_key[group]


@dataclass(frozen=True)
class InboxEntry:
    """One entry handed to the agent; ``deliveries`` counts this delivery."""

    id: str
    fields: dict[str, str]
    deliveries: int


class InboxReader:
    """Reads ``key`` as ``consumer`` of ``group`` and applies the group's retry policy."""

    def __init__(
        self,
        client: Any,
        group: ResolvedGroup,
        key: str,
        consumer: str,
        *,
        log: logging.Logger | None = None,
    ) -> None:
        self.client = client
        self.group = group
        self.key = key
        self.consumer = consumer
        self.retry = group.spec.retry
        self.log = log or logging.getLogger("cortex_flow.client")
        self._cursor = "0"  # own pending entries first, then ">"
        self._due: dict[str, float] = {}  # failed entry -> when (monotonic) its retry is due
        self._stuck: set[str] = set()  # failed for good with no dead_letter: left pending
        self._claim_from = "0-0"
        self._next_claim = 0.0

    @property
    def where(self) -> str:
        return f"group {self.group.name} on {self.key}"

    async def start(self) -> None:
        """Create the group when ``run`` has not (yet): from the flows' ``start``."""
        await ensure_group(self.client, self.key, self.group.name, self.group.spec.start)

    async def next(self, count: int, block: float) -> list[InboxEntry]:
        """The next entries to handle: retries that are due, entries idle past
        ``claim_idle``, then own pending or new ones (waiting up to ``block`` seconds)."""
        now = time.monotonic()
        due = [entry_id for entry_id, at in self._due.items() if at <= now][:count]
        if due:
            for entry_id in due:
                del self._due[entry_id]
            taken = await self.client.xclaim(
                self.key, self.group.name, self.consumer, min_idle_time=0, message_ids=due
            )
            return await self._claimed(taken)
        if now >= self._next_claim:
            entries = await self._autoclaim(count)
            if entries:
                return entries
        return await self._read(count, block)

    async def _read(self, count: int, block: float) -> list[InboxEntry]:
        history = self._cursor != ">"
        if self._due:  # wake up for the first retry that comes due
            block = max(0.0, min(block, min(self._due.values()) - time.monotonic()))
        block_ms = None if history else max(1, int(block * 1000))
        reply = await self.client.xreadgroup(
            self.group.name, self.consumer, {self.key: self._cursor}, count=count, block=block_ms
        )
        items = reply[0][1] if reply else []
        if not history:
            return [InboxEntry(i, dict(f), 1) for i, f in items]
        if not items:
            self._cursor = ">"
            return []
        self._cursor = items[-1][0]
        return await self._claimed(items)

    async def _autoclaim(self, count: int) -> list[InboxEntry]:
        idle_ms = int(self.retry.claim_idle * 1000)
        reply = await self.client.xautoclaim(
            self.key, self.group.name, self.consumer, idle_ms, self._claim_from, count=count
        )
        self._claim_from = str(reply[0])
        if self._claim_from == "0-0":  # the whole list scanned: again after a while
            self._next_claim = time.monotonic() + min(self.retry.claim_idle / 2, CLAIM_EVERY_MAX)
        items = [i for i in reply[1] if i and i[0] is not None and i[1] is not None]
        for entry_id, _ in items:
            self._due.pop(entry_id, None)  # taken now, whatever its backoff said
        entries = await self._claimed(items)
        if entries:
            self.log.info(
                "%s: claimed %d entr%s idle over %gs",
                self.where,
                len(entries),
                "y" if len(entries) == 1 else "ies",
                self.retry.claim_idle,
            )
        return entries

    async def _claimed(self, items: list[Any]) -> list[InboxEntry]:
        """Entries delivered again (own pending, a retry, a claim), with their counts."""
        items = [i for i in items if i and i[0] is not None]
        gone = [i[0] for i in items if not i[1]]  # trimmed or deleted while pending
        if gone:
            await self.client.xack(self.key, self.group.name, *gone)
        live = [(i[0], dict(i[1])) for i in items if i[1] and i[0] not in self._stuck]
        if not live:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in live:
            pipe.xpending_range(
                self.key, self.group.name, entry_id, entry_id, 1, consumername=self.consumer
            )
        counts = {
            rows[0]["message_id"]: int(rows[0]["times_delivered"])
            for rows in await pipe.execute()
            if rows
        }
        entries = []
        for entry_id, fields in live:
            deliveries = counts.get(entry_id)
            if deliveries is None:
                continue  # acknowledged or taken by another consumer meanwhile
            entry = InboxEntry(entry_id, fields, deliveries)
            if deliveries > self.retry.max_deliveries:
                # this delivery is not one to a handler: report the ones that were
                done = InboxEntry(entry_id, fields, deliveries - 1)
                why = (
                    f"delivered {deliveries - 1} times without being acknowledged "
                    "(its consumer crashed or timed out each time)"
                )
                await self.give_up(done, why)
                continue
            entries.append(entry)
        return entries

    async def failed(self, entry: InboxEntry, error: str) -> None:
        """Handling ``entry`` raised: retry it after its backoff, or give up on it."""
        if entry.deliveries >= self.retry.max_deliveries:
            await self.give_up(entry, error)
            return
        delay = backoff_ms(self.retry.backoff, entry.deliveries) / 1000
        self._due[entry.id] = time.monotonic() + delay
        self.log.warning(
            "%s: %s failed (delivery %d of %d): %s; will retry in %s",
            self.where,
            entry.id,
            entry.deliveries,
            self.retry.max_deliveries,
            error,
            format_duration(delay),
        )

    async def give_up(self, entry: InboxEntry, error: str) -> None:
        """Dead-letter ``entry`` (added and acknowledged together), or leave it pending."""
        dlq = self.group.dead_letter
        if dlq is None:
            self._stuck.add(entry.id)
            self.log.error(
                "%s: %s failed %d times (max_deliveries) and the group has no dead_letter, "
                "so it stays pending: %s; add dead_letter: to agents.%s.inbox",
                self.where,
                entry.id,
                entry.deliveries,
                error,
                self.consumer,
            )
            return
        fields = dead_letter_fields(
            entry.fields, self.key, entry.id, self.group.name, entry.deliveries, error
        )
        together = not is_cluster(self.client) or same_slot(self.key, dlq)
        pipe = self.client.pipeline(transaction=together)
        pipe.xadd(dlq, fields)  # never trimmed here: retention trims (runtime/retention.py)
        if together:
            pipe.xack(self.key, self.group.name, entry.id)
        await pipe.execute()
        if not together:  # another slot: add first, acknowledge after (never lost)
            await self.client.xack(self.key, self.group.name, entry.id)
        self.log.warning(
            "%s: %s dead-lettered to %s after %d deliveries: %s",
            self.where,
            entry.id,
            dlq,
            entry.deliveries,
            error,
        )
