"""How ``cortex-flow status`` looks: rich tables, problems first, ages humanised.

:func:`render` draws the plain data :func:`cortex_flow.ops.status.collect` returns; it reads
nothing itself, so ``--json`` and the tables always show the same thing.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from cortex_flow.flow.durations import humanize

__all__ = ["count", "humanize", "render", "wide_console"]


def count(value: int | None) -> str:
    """``1,234``; ``-`` for unknown."""
    return "-" if value is None else f"{value:,}"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", expand=False)
    for column in columns:
        numeric = column in (
            "Length",
            "Pending",
            "Lag",
            "Entries",
            "Inbox",
            "Held",
            "Holds",
            "Max len",
        )
        table.add_column(column, justify="right" if numeric else "left")
    return table


def render(data: dict[str, Any]) -> RenderableType:
    """Tables for people on call: problems first, in colour; ages humanised."""
    parts: list[RenderableType] = [_heading(data)]
    parts.extend(Text(f"  ! {issue}", style="red") for issue in data["problems"])
    parts += [_streams(data["streams"]), _groups(data["groups"]), _agents(data["agents"])]
    if data["dead_letters"]:
        parts.append(_dead_letters(data["dead_letters"]))
    if data.get("retention"):
        parts.append(_retention(data["retention"]))
    if data.get("stale_groups"):
        parts.append(_stale(data["stale_groups"]))
    if data.get("delayed"):
        parts.append(_delayed(data["delayed"]))
    parts.append(_runner(data["runner"]))
    if "duties" in data:
        parts.append(_duties(data["duties"]))
    return Group(*parts)


def _heading(data: dict[str, Any]) -> Text:
    where = data.get("redis", "")
    issues = data["problems"]
    head = Text(f"cortex-flow status{f' · {where}' if where else ''} · ", style="bold")
    head.append(
        f"{len(issues)} problem(s)" if issues else "all healthy",
        style="bold red" if issues else "bold green",
    )
    return head


def _streams(rows: list[dict[str, Any]]) -> Table:
    streams = _table("Streams", "Stream", "Key", "Length", "Oldest", "Newest")
    for s in rows:
        missing = s["status"] != "ok"
        length: Text | str = Text(s["status"], style="yellow") if missing else count(s["length"])
        streams.add_row(
            s["name"],
            s["key"],
            length,
            humanize(s.get("oldest_age")),
            humanize(s.get("newest_age")),
        )
    return streams


def _groups(rows: list[dict[str, Any]]) -> Table:
    groups = _table("Groups", "Group", "Key", "Pending", "Lag", "Oldest pending", "Consumers")
    for g in rows:
        if g["status"] != "ok":
            groups.add_row(g["name"], g["key"], Text(g["status"], style="yellow"), "", "", "")
            continue
        idle = g["oldest_pending_idle"]
        oldest = Text("-")
        if idle is not None:
            oldest = Text(
                f"{humanize(g['oldest_pending_age'])} old, idle {humanize(idle)}, "
                f"{g['oldest_pending_deliveries']}x",
                style="red" if g["stale"] else "",
            )
        consumers = "\n".join(
            f"{c['name']}: {count(c['pending'])} pending, idle {humanize(c['idle'])}"
            for c in g["consumers"]
        )
        lag = count(g["lag"]) if g["lag"] is not None else "unknown"
        groups.add_row(g["name"], g["key"], count(g["pending"]), lag, oldest, consumers or "-")
    return groups


def _agents(rows: list[dict[str, Any]]) -> Table:
    agents = _table("Agents", "Agent", "Status", "Last heartbeat", "Timeout", "Inbox", "Read by")
    colours = {"up": "green", "down": "bold red", "never seen": "yellow", "unwatched": "dim"}
    for a in rows:
        status = Text(a["status"], style=colours.get(a["status"], ""))
        if a["reported"]:
            status.append(f" ({a['reported']})", style="dim")
        if a.get("why"):
            status.append(f" ({a['why']})", style="dim")
        beat = f"{humanize(a['heartbeat_age'])} ago" if a["heartbeat_age"] is not None else "-"
        read_by = Text(", ".join(a["read_by"]) or ("nobody" if a["inbox_keys"] else "-"))
        if a["inbox_keys"] and not a["read_by"]:
            read_by.stylize("yellow")
        agents.add_row(a["name"], status, beat, humanize(a["timeout"]), count(a["inbox"]), read_by)
    return agents


def _dead_letters(rows: list[dict[str, Any]]) -> Table:
    dead = _table("Dead letters", "Key", "Entries", "Oldest", "Newest")
    for d in rows:
        entries = Text(count(d["length"]) if d["status"] == "ok" else d["status"])
        if d["length"]:
            entries.stylize("bold red")
        dead.add_row(
            d["key"], entries, humanize(d.get("oldest_age")), humanize(d.get("newest_age"))
        )
    return dead


def _retention(rows: list[dict[str, Any]]) -> Table:
    held = _table("Held above retention", "Key", "Group", "Held", "Max len", "Since")
    for r in rows:
        held.add_row(
            r["key"],
            Text(str(r["group"]), style="bold red"),
            count(r["held"]),
            count(r["max_len"]),
            f"{humanize(r['held_for'])} ago",
        )
    return held


def _delayed(rows: list[dict[str, Any]]) -> Table:
    table = _table("Delayed messages", "Key", "Waiting", "Next due")
    for row in rows:
        due = row["next_due_in"]
        when = f"in {humanize(due)}" if due >= 0 else f"{humanize(-due)} overdue"
        table.add_row(row["key"], count(row["waiting"]), when)
    return table


def _stale(rows: list[dict[str, Any]]) -> Table:
    title = "Stale groups (no flow declares them)"
    stale = _table(title, "Group", "Key", "Holds", "Pending", "Lag")
    for r in rows:
        stale.add_row(
            Text(r["name"], style="yellow"),
            r["key"],
            count(r["holds"]),
            count(r["pending"]),
            count(r["lag"]),
        )
    return stale


def _runner(runner: dict[str, Any]) -> Text:
    """Readiness and the last reload from the admin endpoint, and the last heartbeat."""
    line = Text(f"Runner {runner['name']}: ", style="bold")
    admin = runner.get("admin_status") or {}
    if admin.get("reachable"):
        line.append(
            "ready" if admin["ready"] else "not ready", "green" if admin["ready"] else "red"
        )
        reload = admin.get("reload") or {}
        if reload:
            line.append(f"; last reload {_last_reload(reload)}")
            for error in reload.get("errors") or []:
                line.append(f"\n  reload error: {error}", style="red")
        for group, flow in sorted((admin.get("flow") or {}).items()):
            line.append(
                f"\n  group {group}: {flow['waiting']} held back by flow control, "
                f"{humanize(flow['rate_wait_seconds'])} waited for rate tokens, "
                f"{flow['duplicates']} duplicate(s) acknowledged unhandled"
            )
    elif admin:
        line.append(f"not reachable ({admin.get('admin') or 'admin off'}: {admin['reason']})")
        line.stylize("yellow", len(f"Runner {runner['name']}: "))
    beat = runner["heartbeat_age"]
    line.append(f"; last heartbeat {humanize(beat)} ago" if beat is not None else "")
    return line


def _last_reload(reload: dict[str, Any]) -> str:
    """``applied 5m ago``, or ``never`` before the first reload."""
    outcome, age = reload.get("last_outcome"), reload.get("last_age")
    if outcome is None:
        return "never"
    return f"{outcome} {humanize(age)} ago" if age is not None else str(outcome)


def _duties(rows: list[dict[str, Any]]) -> Text:
    """Which runner process holds each duty (agent events, retention, dead consumers)."""
    held = [f"{d['name']} {d['holder']} (token {d['token']})" for d in rows if d["holder"]]
    free = [d["name"] for d in rows if not d["holder"]]
    line = Text("Duties: ", style="bold")
    line.append("; ".join(held) if held else "none held (no runner running)")
    if held and free:
        line.append(f"; not held: {', '.join(free)}", style="yellow")
    return line


def wide_console() -> Console:
    """A console on stdout; 200 columns wide when piped, so tables are not cut to 80.

    Markup and emoji codes are off: every string shown comes from users or Redis (a key
    ``nc:x:s`` must print as written, not with an emoji), and styles are set with ``Text``.
    """
    console = Console(markup=False, emoji=False, highlight=False)
    if console.is_terminal:
        return console
    return Console(width=200, markup=False, emoji=False, highlight=False)
