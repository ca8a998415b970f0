"""``cortex-flow dlq list|show|replay|purge``: the dead-letter library on the command line.

Parses the filters, calls :mod:`cortex_flow.ops.dlq` and prints for people (or ``--json``).
Replaying or purging more than a screenful shows a progress bar on a terminal. A replay
appends to the source key, which every group reading that key receives: when that is more
than one group, replay warns and needs ``--yes`` (``--dry-run`` only warns).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from cortex_flow.cli.args import load
from cortex_flow.cli.views import humanize, wide_console
from cortex_flow.errors import CortexFlowError, UsageError
from cortex_flow.flow.durations import parse_duration
from cortex_flow.flow.topology import Resolved, resolve
from cortex_flow.ops.dlq import DlqEntry, Filters, Outcome, list_entries, purge, replay
from cortex_flow.wire.access import connect_project
from cortex_flow.wire.connection import RedisClient
from cortex_flow.wire.entryids import id_ms

__all__ = ["NotFound", "command", "dlq_keys", "filters_from", "shared_sources"]

PROGRESS_ABOVE = 100
_ID = re.compile(r"^\d+(-\d+)?$")


class NotFound(CortexFlowError):
    """An entry named on the command line is not in the dead-letter stream."""


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


def _short(text: str | None, width: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _entry_json(entry: DlqEntry) -> dict[str, Any]:
    shown = asdict(entry)
    shown["fields"] = entry.shown_fields()  # bytes that are not UTF-8 as \xNN
    shown["not_utf8"] = entry.not_utf8
    return shown


def _table(entries: list[DlqEntry], keys: list[str], now: float) -> Table:
    table = Table(expand=False)
    columns = ["ID", "Age", "Source", "Group", "Deliveries", "Replays", "Error", "Fields"]
    if len(keys) > 1:
        columns.insert(0, "DLQ")
    for column in columns:
        table.add_column(column, justify="right" if column in ("Deliveries", "Replays") else "left")
    for e in entries:
        fields = _short(", ".join(f"{k}={v}" for k, v in e.shown_fields().items()), 50)
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
    console = wide_console()
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
    console = wide_console()
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
        for name, value in e.shown_fields().items():
            table.add_row(name, value)
        if e.not_utf8:
            table.add_section()
            table.add_row(
                "not UTF-8",
                f"{', '.join(e.not_utf8)} (bytes shown as \\xNN; replay sends the original bytes)",
            )
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
    entries = await list_entries(client, keys, f)
    missing = [i for i in f.ids if not any(_same_id(i, e.id) for e in entries)]
    if missing:
        raise NotFound(
            f"{', '.join(missing)} not found in {', '.join(keys)} (or not matching the "
            f"filters); nothing was {verb}d"
        )
    console = wide_console()
    if not entries:
        console.print(f"no dead letters match; nothing to {verb}", highlight=False)
        return 0
    if replaying:
        _confirm_shared_sources(entries, resolved, args.yes, args.dry_run)
    elif not args.yes and not args.dry_run and not _confirm_purge(entries, keys):
        print("nothing purged", file=sys.stderr)
        return 1
    stderr = Console(stderr=True)
    quiet = len(entries) <= PROGRESS_ABOVE or not stderr.is_terminal
    with Progress(console=stderr, transient=True, disable=quiet) as bar:
        task = bar.add_task(f"{verb} {len(entries):,} entries", total=len(entries))

        def advance(n: int) -> None:
            bar.advance(task, n)

        if replaying:
            outcome = await replay(client, entries, dry_run=args.dry_run, progress=advance)
        else:
            outcome = await purge(client, entries, args.dry_run, advance)
    _report(console, outcome, verb, args.dry_run, entries)
    return 1 if outcome.skipped else 0


def shared_sources(entries: list[DlqEntry], resolved: Resolved) -> dict[str, list[str]]:
    """Source keys of ``entries`` that more than one declared group reads, with the groups.

    A replay appends to the source key, so every group reading it receives the entry
    again, not only the one (``dlq_group``) that dead-lettered it.
    """
    readers: dict[str, list[str]] = {}
    for group in resolved.groups.values():
        for key in group.keys:
            readers.setdefault(key.key, []).append(group.name)
    sources = sorted({e.source for e in entries if e.source})
    return {key: readers[key] for key in sources if len(readers.get(key, [])) > 1}


def _confirm_shared_sources(
    entries: list[DlqEntry], resolved: Resolved, yes: bool, dry_run: bool
) -> None:
    """Warn when a replay reaches groups besides the one that failed; real ones need --yes."""
    shared = shared_sources(entries, resolved)
    if not shared:
        return
    lines = [
        f"{key} is read by groups {', '.join(groups)}: replaying delivers it to all of them"
        for key, groups in shared.items()
    ]
    if not yes and not dry_run:
        raise UsageError("\n".join(f"{line}; pass --yes to confirm" for line in lines))
    hint = "; pass --yes to confirm" if not yes else ""
    for line in lines:
        print(f"warning: {line}{hint}", file=sys.stderr)


def _confirm_purge(entries: list[DlqEntry], keys: list[str]) -> bool:
    """Ask before deleting; without a terminal to ask on, refuse (``--yes`` skips this)."""
    count = f"{len(entries):,} dead letter{'s' if len(entries) != 1 else ''}"
    question = f"purge {count} from {', '.join(keys)}? This cannot be undone."
    if not sys.stdin.isatty():
        raise UsageError(
            f"{question} Not asked: stdin is not a terminal; pass --yes to confirm (see what "
            "would go with --dry-run)"
        )
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


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
        console.print(Text(f"skipped {entry_id}: {why}", style="red"))


async def _main(args: argparse.Namespace) -> int:
    project = load(args)
    resolved = resolve(project.topology, project.config.runner.name)
    keys = dlq_keys(resolved, args.dlq)
    filters = filters_from(args, resolved)
    client = await connect_project(project)
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
