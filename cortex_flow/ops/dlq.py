"""Dead letters: read them, send them back to where they came from, or delete them.

A dead letter holds the original fields plus ``dlq_stream`` (the source key), ``dlq_id``,
``dlq_group``, ``dlq_deliveries``, ``dlq_error``, ``dlq_at`` and, once replayed and failed
again, ``dlq_replays``. Every function takes a client; ``cortex-flow dlq`` is
:mod:`cortex_flow.cli.dlq`. Age filters become ID ranges (a dead letter's ID is the time it
was dead-lettered), and the stream is read in pages, so a limit on a huge dead-letter
stream stays cheap.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cortex_flow.wire.codec import is_utf8, printable
from cortex_flow.wire.connection import RedisClient, is_cluster, same_slot
from cortex_flow.wire.entryids import id_key, id_ms

__all__ = ["DlqEntry", "Filters", "Outcome", "list_entries", "purge", "replay"]

PAGE = 500  # entries per XRANGE when reading a dead-letter stream
BATCH = 100  # entries per round trip when replaying or purging

# Re-checks the entry is still there, publishes, then deletes: a concurrent replay or purge
# cannot duplicate it, and a failing XADD (wrong key type) runs before anything is written.
_REPLAY = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class DlqEntry:
    """One dead letter: where it came from, why it failed, and its original fields."""

    dlq_key: str
    id: str
    source: str | None
    source_id: str | None
    group: str | None
    deliveries: int | None
    error: str | None
    at: str | None
    replays: int
    fields: dict[str, str]

    @classmethod
    def parse(cls, dlq_key: str, entry_id: str, raw: Mapping[str, str]) -> DlqEntry:
        def number(name: str) -> int | None:
            value = raw.get(name, "")
            return int(value) if value.isdigit() else None

        return cls(
            dlq_key=dlq_key,
            id=entry_id,
            source=raw.get("dlq_stream"),
            source_id=raw.get("dlq_id"),
            group=raw.get("dlq_group"),
            deliveries=number("dlq_deliveries"),
            error=raw.get("dlq_error"),
            at=raw.get("dlq_at"),
            replays=number("dlq_replays") or 0,
            fields={k: v for k, v in raw.items() if not k.startswith("dlq_")},
        )

    def shown_fields(self) -> dict[str, str]:
        """The original fields for people: bytes that are not UTF-8 as ``\\xNN``."""
        return {printable(k): printable(v) for k, v in self.fields.items()}

    @property
    def not_utf8(self) -> list[str]:
        """The fields (as shown) whose name or value is not UTF-8; replay keeps their bytes."""
        return [printable(k) for k, v in self.fields.items() if not is_utf8(k) or not is_utf8(v)]

    def replayed_fields(self) -> dict[str, str]:
        """What a replay publishes: the original fields and the replay count so far."""
        return {**self.fields, "dlq_replays": str(self.replays + 1)}


@dataclass(frozen=True)
class Filters:
    """Which dead letters to take; every given condition must hold."""

    ids: tuple[str, ...] = ()
    sources: frozenset[str] | None = None
    group: str | None = None
    error: str | None = None  # case-insensitive substring of dlq_error
    older_than: float | None = None  # seconds
    newer_than: float | None = None
    limit: int | None = None
    now: float | None = None  # epoch seconds; default: this machine's clock

    def matches(self, entry: DlqEntry) -> bool:
        if self.sources is not None and entry.source not in self.sources:
            return False
        if self.group is not None and entry.group != self.group:
            return False
        return self.error is None or self.error.lower() in (entry.error or "").lower()

    def id_range(self) -> tuple[str, str]:
        """The ID range the age filters allow (IDs are dead-lettering times)."""
        now = time.time() if self.now is None else self.now
        low, high = "-", "+"
        if self.newer_than is not None:
            low = str(int((now - self.newer_than) * 1000))
        if self.older_than is not None:
            high = f"({int((now - self.older_than) * 1000)}-0"
        return low, high

    @property
    def narrowed(self) -> bool:
        """True when anything but the limit restricts the selection."""
        return bool(self.ids) or any(
            v is not None
            for v in (self.sources, self.group, self.error, self.older_than, self.newer_than)
        )


@dataclass
class Outcome:
    """What a replay or purge did (or, with ``dry_run``, would do)."""

    done: int = 0
    missing: int = 0  # gone meanwhile: replayed or purged by someone else
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, why)
    targets: Counter[str] = field(default_factory=Counter)


async def list_entries(
    client: RedisClient, keys: Sequence[str], filters: Filters
) -> list[DlqEntry]:
    """Matching dead letters of ``keys``, oldest first, at most ``filters.limit``."""
    low, high = filters.id_range()
    found: list[DlqEntry] = []
    if filters.ids:
        pipe = client.pipeline(transaction=False)
        pairs = [(key, entry_id) for key in keys for entry_id in dict.fromkeys(filters.ids)]
        for key, entry_id in pairs:
            pipe.xrange(key, min=entry_id, max=entry_id)
        for (key, _), page in zip(pairs, await pipe.execute(), strict=True):
            found.extend(DlqEntry.parse(key, i, raw) for i, raw in page)
        found = [e for e in found if filters.matches(e) and _in_range(e.id, low, high)]
    else:
        for key in keys:
            found.extend(await _scan(client, key, filters, low, high))
    found.sort(key=lambda e: id_key(e.id))
    return found[: filters.limit] if filters.limit is not None else found


async def _scan(
    client: RedisClient, key: str, filters: Filters, low: str, high: str
) -> list[DlqEntry]:
    out: list[DlqEntry] = []
    cursor = low
    while filters.limit is None or len(out) < filters.limit:
        page: Any = await client.xrange(key, min=cursor, max=high, count=PAGE)
        out.extend(e for i, raw in page if filters.matches(e := DlqEntry.parse(key, i, raw)))
        if len(page) < PAGE:
            break
        cursor = f"({page[-1][0]}"
    return out


def _in_range(entry_id: str, low: str, high: str) -> bool:
    after = low == "-" or id_ms(entry_id) >= int(low)
    return after and (high == "+" or id_key(entry_id) < id_key(high.lstrip("(")))


async def replay(
    client: RedisClient,
    entries: Iterable[DlqEntry],
    *,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Publish each entry's original fields back to its source and delete it from the DLQ.

    One atomic step per entry where both keys share a slot (always on a single server);
    across cluster slots, publish first and delete after, so a crash duplicates, never loses.
    Nothing is trimmed here: the retention duty trims the source keys.
    """
    outcome = Outcome()
    todo: list[DlqEntry] = []
    for entry in entries:
        if not entry.source:
            outcome.skipped.append((entry.id, "it has no dlq_stream field naming its source"))
        else:
            todo.append(entry)
    for start in range(0, len(todo), BATCH):
        batch = todo[start : start + BATCH]
        if dry_run:
            done = [1] * len(batch)
        elif not is_cluster(client) or all(same_slot(e.dlq_key, e.source or "") for e in batch):
            pipe = client.pipeline(transaction=False)
            for e in batch:
                args = [e.id]
                args += [x for pair in e.replayed_fields().items() for x in pair]
                # EVAL, not EVALSHA: a cluster pipeline does not load scripts for us
                pipe.eval(_REPLAY, 2, e.dlq_key, e.source or "", *args)
            done = list(await pipe.execute())
        else:
            done = await _replay_across_slots(client, batch)
        for e, ok in zip(batch, done, strict=True):
            if ok:
                outcome.done += 1
                outcome.targets[e.source or ""] += 1
            else:
                outcome.missing += 1
        if progress is not None:
            progress(len(batch))
    return outcome


async def _replay_across_slots(client: RedisClient, batch: list[DlqEntry]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for e in batch:
        pipe.xadd(e.source or "", e.replayed_fields())  # type: ignore[arg-type]
    await pipe.execute()
    pipe = client.pipeline(transaction=False)
    for e in batch:
        pipe.xdel(e.dlq_key, e.id)
    return [int(n) for n in await pipe.execute()]


async def purge(
    client: RedisClient,
    entries: Iterable[DlqEntry],
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Delete entries from their dead-letter stream."""
    outcome = Outcome()
    todo = list(entries)
    for start in range(0, len(todo), BATCH):
        batch = todo[start : start + BATCH]
        by_key: dict[str, list[str]] = {}
        for e in batch:
            by_key.setdefault(e.dlq_key, []).append(e.id)
        if dry_run:
            outcome.done += len(batch)
        else:
            pipe = client.pipeline(transaction=False)
            for key, ids in by_key.items():
                pipe.xdel(key, *ids)
            deleted = sum(int(n) for n in await pipe.execute())
            outcome.done += deleted
            outcome.missing += len(batch) - deleted
        for key, ids in by_key.items():
            outcome.targets[key] += len(ids)
        if progress is not None:
            progress(len(batch))
    return outcome
