"""``cortex-flow dlq``: inspect dead letters and send them back to where they came from.

A dead letter holds the original fields plus ``dlq_stream`` (the source key), ``dlq_id``,
``dlq_group``, ``dlq_deliveries``, ``dlq_error``, ``dlq_at`` and, once replayed and failed
again, ``dlq_replays``. The library functions take a client; :func:`command` is the CLI.
Age filters become ID ranges (a dead letter's ID is the time it was dead-lettered), and
the stream is read in pages, so ``--limit`` on a huge dead-letter stream stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cortex_flow.commands import load
from cortex_flow.connection import RedisClient, is_cluster, same_slot
from cortex_flow.durations import parse_duration
from cortex_flow.errors import CortexFlowError, UsageError
from cortex_flow.status import connect, humanize, id_key, id_ms
from cortex_flow.topology import Resolved, resolve

__all__ = ["DlqEntry", "Filters", "Outcome", "command", "list_entries", "purge", "replay"]

PAGE = 500  # entries per XRANGE when reading a dead-letter stream
BATCH = 100  # entries per round trip when replaying or purging
PROGRESS_ABOVE = 100
_ID = re.compile(r"^\d+(-\d+)?$")

# Re-checks the entry is still there, publishes, then deletes: a concurrent replay or purge
# cannot duplicate it, and a failing XADD (wrong key type) runs before anything is written.
_REPLAY = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
else
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
end
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""


class NotFound(CortexFlowError):
    """An entry named on the command line is not in the dead-letter stream."""


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
    maxlen: Mapping[str, int] | None = None,
) -> Outcome:
    """Publish each entry's original fields back to its source and delete it from the DLQ.

    One atomic step per entry where both keys share a slot (always on a single server);
    across cluster slots, publish first and delete after, so a crash duplicates, never loses.
    ``maxlen`` caps source keys the way their stream declares (XADD MAXLEN ~).
    """
    outcome = Outcome()
    todo: list[DlqEntry] = []
    for entry in entries:
        if not entry.source:
            outcome.skipped.append((entry.id, "it has no dlq_stream field naming its source"))
        else:
            todo.append(entry)
    caps = maxlen or {}
    for start in range(0, len(todo), BATCH):
        batch = todo[start : start + BATCH]
        if dry_run:
            done = [1] * len(batch)
        elif not is_cluster(client) or all(same_slot(e.dlq_key, e.source or "") for e in batch):
            pipe = client.pipeline(transaction=False)
            for e in batch:
                args = [e.id, caps.get(e.source or "", "")]
                args += [x for pair in e.replayed_fields().items() for x in pair]
                # EVAL, not EVALSHA: a cluster pipeline does not load scripts for us
                pipe.eval(_REPLAY, 2, e.dlq_key, e.source or "", *args)
            done = list(await pipe.execute())
        else:
            done = await _replay_across_slots(client, batch, caps)
        for e, ok in zip(batch, done, strict=True):
            if ok:
                outcome.done += 1
                outcome.targets[e.source or ""] += 1
            else:
                outcome.missing += 1
        if progress is not None:
            progress(len(batch))
    return outcome


async def _replay_across_slots(
    client: RedisClient, batch: list[DlqEntry], caps: Mapping[str, int]
) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for e in batch:
        cap = caps.get(e.source or "")
        pipe.xadd(e.source or "", e.replayed_fields(), maxlen=cap, approximate=True)  # type: ignore[arg-type]
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


# --- the command ------------------------------------------------------------------------------


def dlq_keys(resolved: Resolved, choice: str | None) -> list[str]:
    """The dead-letter keys to read: ``--dlq`` (a stream name or key), else all declared."""
    if choice is None:
        keys = sorted({g.dead_letter for g in resolved.groups.values() if g.dead_letter})
        if not keys:
            raise UsageError("no group declares a dead_letter stream; name one with --dlq KEY")
        return keys
    stream = resolved.streams.get(choice)
    if stream is None:
        return [choice]
    if stream.dynamic or not stream.keys:
        raise UsageError(f"stream {choice} has no fixed key; pass the Redis key to --dlq")
    return [k.key for k in stream.keys]


def _seconds(option: str, value: str | None) -> float | None:
    try:
        return None if value is None else parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def filters_from(args: argparse.Namespace, resolved: Resolved) -> Filters:
    """Filters from the command line; ``--stream`` takes a stream name or a Redis key."""
    ids = tuple([args.id] if args.dlq_command == "show" else args.ids)
    bad = [i for i in ids if not _ID.match(i)]
    if bad:
        raise UsageError(f"{', '.join(bad)}: not a stream entry ID (like 1700000000000-0)")
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    source = getattr(args, "source", None)
    sources = None
    if source is not None:
        stream = resolved.streams.get(source)
        sources = frozenset([k.key for k in stream.keys] if stream else [source])
    return Filters(
        ids=ids,
        sources=sources,
        group=getattr(args, "group", None),
        error=getattr(args, "error", None),
        older_than=_seconds("--older-than", getattr(args, "older_than", None)),
        newer_than=_seconds("--newer-than", getattr(args, "newer_than", None)),
        limit=limit,
    )


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=200)


def _short(text: str | None, width: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _entry_json(entry: DlqEntry) -> dict[str, Any]:
    return asdict(entry)


def _table(entries: list[DlqEntry], keys: list[str], now: float) -> Table:
    table = Table(expand=False)
    columns = ["ID", "Age", "Source", "Group", "Deliveries", "Replays", "Error", "Fields"]
    if len(keys) > 1:
        columns.insert(0, "DLQ")
    for column in columns:
        table.add_column(column, justify="right" if column in ("Deliveries", "Replays") else "left")
    for e in entries:
        fields = _short(", ".join(f"{k}={v}" for k, v in e.fields.items()), 50)
        row = [
            e.id,
            humanize(max(0.0, now - id_ms(e.id) / 1000)),
            e.source or "?",
            e.group or "?",
            str(e.deliveries) if e.deliveries is not None else "?",
            str(e.replays),
            _short(e.error),
            fields,
        ]
        table.add_row(*([e.dlq_key, *row] if len(keys) > 1 else row))
    return table


async def _list(client: RedisClient, args: argparse.Namespace, keys: list[str], f: Filters) -> int:
    entries = await list_entries(client, keys, f)
    if args.json:
        print(json.dumps([_entry_json(e) for e in entries], indent=2))
        return 0
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xlen(key)
    totals = dict(zip(keys, await pipe.execute(), strict=True))
    console = _console()
    held = "; ".join(f"{k} holds {n:,} entr{'y' if n == 1 else 'ies'}" for k, n in totals.items())
    if not entries:
        console.print(f"{held}; none match", highlight=False)
        return 0
    shown = f"{len(entries):,}" + (" matching" if f.narrowed else "")
    if f.limit is not None and len(entries) == f.limit:
        shown = f"the oldest {shown} (--limit {f.limit})"
    console.print(f"{held}; showing {shown}", highlight=False)
    console.print(_table(entries, keys, time.time()))
    return 0


async def _show(client: RedisClient, args: argparse.Namespace, keys: list[str], f: Filters) -> int:
    entries = await list_entries(client, keys, f)
    if not entries:
        raise NotFound(
            f"no entry {args.id} in {', '.join(keys)}; `cortex-flow dlq list` shows the IDs"
        )
    if args.json:
        print(json.dumps(_entry_json(entries[0]), indent=2))
        return 0
    console = _console()
    for e in entries:
        table = Table(title=f"{e.dlq_key} {e.id}", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        age = humanize(max(0.0, time.time() - id_ms(e.id) / 1000))
        meta = {
            "source": e.source,
            "source id": e.source_id,
            "group": e.group,
            "deliveries": e.deliveries,
            "replays": e.replays,
            "dead-lettered": f"{e.at} ({age} ago)",
            "error": e.error,
        }
        for name, value in meta.items():
            table.add_row(name, "?" if value is None else str(value))
        table.add_section()
        for name, value in e.fields.items():
            table.add_row(name, value)
        console.print(table)
    return 0


async def _change(
    client: RedisClient,
    args: argparse.Namespace,
    keys: list[str],
    f: Filters,
    resolved: Resolved,
) -> int:
    replaying = args.dlq_command == "replay"
    verb = "replay" if replaying else "purge"
    if not replaying and not f.narrowed and not args.yes and not args.dry_run:
        raise UsageError(
            f"purge without IDs or filters deletes every entry of {', '.join(keys)}; pass --yes "
            "to confirm (see what would go with --dry-run)"
        )
    entries = await list_entries(client, keys, f)
    missing = [i for i in f.ids if not any(_same_id(i, e.id) for e in entries)]
    if missing:
        raise NotFound(
            f"{', '.join(missing)} not found in {', '.join(keys)} (or not matching the "
            f"filters); nothing was {verb}d"
        )
    console = _console()
    if not entries:
        console.print(f"no dead letters match; nothing to {verb}", highlight=False)
        return 0
    caps = {
        k.key: s.spec.maxlen for s in resolved.streams.values() if s.spec.maxlen for k in s.keys
    }
    stderr = Console(stderr=True)
    quiet = len(entries) <= PROGRESS_ABOVE or not stderr.is_terminal
    with Progress(console=stderr, transient=True, disable=quiet) as bar:
        task = bar.add_task(f"{verb} {len(entries):,} entries", total=len(entries))

        def advance(n: int) -> None:
            bar.advance(task, n)

        if replaying:
            outcome = await replay(
                client, entries, dry_run=args.dry_run, progress=advance, maxlen=caps
            )
        else:
            outcome = await purge(client, entries, args.dry_run, advance)
    _report(console, outcome, verb, args.dry_run, entries)
    return 1 if outcome.skipped else 0


def _same_id(given: str, entry_id: str) -> bool:
    """``given`` names ``entry_id``; a bare millisecond ID names every entry of that ms."""
    return given == entry_id or ("-" not in given and entry_id.startswith(given + "-"))


def _report(
    console: Console, outcome: Outcome, verb: str, dry_run: bool, entries: list[DlqEntry]
) -> None:
    past = {"replay": "replayed", "purge": "purged"}[verb]
    done = f"{'would ' + verb if dry_run else past} {outcome.done:,} entr"
    done += "y" if outcome.done == 1 else "ies"
    where = ", ".join(
        f"{n:,} {'to' if verb == 'replay' else 'from'} {k}"
        for k, n in sorted(outcome.targets.items())
    )
    console.print(f"{done}: {where}" if where else done, highlight=False)
    if dry_run:
        for e in entries[:20]:
            console.print(f"  {e.dlq_key} {e.id} -> {e.source or '?'}", highlight=False)
        if len(entries) > 20:
            console.print(f"  … and {len(entries) - 20:,} more", highlight=False)
    if outcome.missing:
        console.print(
            f"{outcome.missing:,} entries were already gone (replayed or purged meanwhile)",
            highlight=False,
        )
    for entry_id, why in outcome.skipped:
        console.print(f"[red]skipped {entry_id}: {why}[/red]", highlight=False)


async def _main(args: argparse.Namespace) -> int:
    project = load(args)
    resolved = resolve(project.topology, project.config.runner.name)
    keys = dlq_keys(resolved, args.dlq)
    filters = filters_from(args, resolved)
    client = await connect(project)
    try:
        if args.dlq_command == "list":
            return await _list(client, args, keys, filters)
        if args.dlq_command == "show":
            return await _show(client, args, keys, filters)
        return await _change(client, args, keys, filters, resolved)
    finally:
        await client.aclose()


def command(args: argparse.Namespace) -> int:
    """``cortex-flow dlq list|show|replay|purge``."""
    return asyncio.run(_main(args))
