"""What the dashboard shows, as plain data: pages of rows, sparklines and the topology.

Everything here works on what :func:`cortex_flow.ops.status.collect` read in its pipelined
rounds and on the runner's own counters; nothing here talks to Redis, so a page of 1,000
agents costs no more round trips than a page of ten. The templates in ``cortex_flow/ui``
turn these dicts into HTML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from cortex_flow.flow.durations import humanize
from cortex_flow.flow.topology import Resolved

__all__ = ["PAGE_SIZES", "Page", "page_of", "sparkline", "summary", "topology_svg"]

# rows per page, by table (the query parameter is ``<table>_page``)
PAGE_SIZES = {"streams": 50, "groups": 50, "agents": 50, "dlq": 20}


@dataclass(frozen=True)
class Page:
    """One page of a table, and the links to its neighbours."""

    table: str
    rows: list[Any]
    number: int  # 1-based
    pages: int
    total: int
    prev_url: str | None
    next_url: str | None


def page_of(table: str, rows: list[Any], query: dict[str, str], total: int | None = None) -> Page:
    """The page of ``rows`` that ``query`` asks for (``<table>_page``), clamped to the range.

    ``total`` is given when ``rows`` is already only the wanted page (dead letters).
    """
    size = PAGE_SIZES[table]
    count = len(rows) if total is None else total
    pages = max(1, math.ceil(count / size))
    try:
        number = min(max(1, int(query.get(f"{table}_page", "1"))), pages)
    except ValueError:
        number = 1
    shown = rows if total is not None else rows[(number - 1) * size : number * size]

    def link(n: int) -> str | None:
        if not 1 <= n <= pages or n == number:
            return None
        return "?" + urlencode({**query, f"{table}_page": str(n)})

    return Page(table, shown, number, pages, count, link(number - 1), link(number + 1))


def sparkline(values: list[float], width: int = 120, height: int = 24) -> str:
    """An inline SVG polyline of ``values`` (messages per second), newest on the right."""
    if len(values) < 2:
        return f'<svg class="spark" width="{width}" height="{height}" aria-hidden="true"></svg>'
    top = max(values) or 1.0
    step = width / (len(values) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 1 - (v / top) * (height - 2):.1f}" for i, v in enumerate(values)
    )
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="up to {top:.1f}/s">'
        f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/></svg>'
    )


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """The counts at the top of the page."""
    agents = data["agents"]
    groups = [g for g in data["groups"] if g.get("status") == "ok"]
    return {
        "streams": len(data["streams"]),
        "entries": sum(s.get("length") or 0 for s in data["streams"]),
        "groups": len(data["groups"]),
        "pending": sum(g["pending"] for g in groups),
        "lag": sum(g["lag"] or 0 for g in groups),
        "agents_up": sum(1 for a in agents if a["status"] == "up"),
        "agents_down": sum(1 for a in agents if a["status"] in ("down", "never seen")),
        "dead_letters": sum(d.get("length") or 0 for d in data["dead_letters"]),
        "problems": len(data["problems"]),
    }


def age(seconds: float | None) -> str:
    """``3m`` / ``-`` for a template."""
    return "-" if seconds is None else humanize(seconds)


# --- the topology, drawn without mermaid.js -----------------------------------------------

AGENTS_DRAWN = 30  # more agents than this are drawn as one node
_ROW = 34  # px between nodes in a column
_COLUMNS = {"stream": 20, "group": 300, "target": 560}
_WIDTH = {"stream": 220, "group": 200, "target": 200}


def _esc(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def topology_svg(resolved: Resolved) -> str:
    """Streams on the left, groups in the middle, calls/http/drops and agents on the right;
    arrows for reads, routes (dashed back to a stream) and dead letters (red)."""
    streams = list(resolved.streams)
    groups = list(resolved.groups)
    targets: list[tuple[str, str]] = []  # (id, label)
    edges: list[tuple[str, str, str]] = []  # (from id, to id, kind)
    for name, group in resolved.groups.items():
        spec = group.spec
        edges.append((f"s:{spec.stream}", f"g:{name}", "read"))
        for index, route in enumerate(spec.routes):
            if route.to is not None:
                edges.append((f"g:{name}", f"s:{route.to}", "route"))
                continue
            if route.call is not None:
                label = f"call {route.call.function}"
            elif route.http is not None:
                label = f"http {route.http.url}"
            else:
                label = "drop"
            targets.append((f"t:{name}:{index}", label))
            edges.append((f"g:{name}", f"t:{name}:{index}", "route"))
        if spec.dead_letter:
            edges.append((f"g:{name}", f"s:{spec.dead_letter}", "dead"))
    if len(resolved.agents) <= AGENTS_DRAWN:
        targets.extend((f"a:{agent}", f"agent {agent}") for agent in resolved.agents)
    else:  # a thousand boxes say less than their number; the agents table lists them
        targets.append(("a:*", f"{len(resolved.agents)} agents"))
    where: dict[str, tuple[float, float, str]] = {}
    nodes = []
    for column, items in (
        ("stream", [(f"s:{n}", f"stream {n}") for n in streams]),
        ("group", [(f"g:{n}", f"group {n}") for n in groups]),
        ("target", targets),
    ):
        x = _COLUMNS[column]
        for row, (node, label) in enumerate(items):
            y = 20 + row * _ROW
            where[node] = (x, y, column)
            shown = label if len(label) <= 30 else label[:29] + "…"
            nodes.append(
                f'<g class="node {column}" data-node="{_esc(node)}"><title>{_esc(label)}</title>'
                f'<rect x="{x}" y="{y}" width="{_WIDTH[column]}" height="24" rx="5"/>'
                f'<text x="{x + 8}" y="{y + 16}">{_esc(shown)}</text></g>'
            )
    lines = []
    for source, target, kind in edges:
        if source not in where or target not in where:
            continue
        x1, y1, column = where[source]
        x2, y2, _ = where[target]
        y1, y2 = y1 + 12, y2 + 12
        if x2 < x1:  # back to a stream on the left: from the group's left side
            x2 += _WIDTH["stream"]
            mid = (x1 + x2) / 2
            path = f"M{x1},{y1} C{mid},{y1 + 14} {mid},{y2 + 14} {x2},{y2}"
        else:
            x1 += _WIDTH[column]
            mid = (x1 + x2) / 2
            path = f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}"
        lines.append(f'<path class="edge {kind}" d="{path}" marker-end="url(#arrow)"/>')
    height = 40 + _ROW * max(len(streams), len(groups), len(targets), 1)
    return (
        f'<svg class="topology" width="780" height="{height}" viewBox="0 0 780 {height}" '
        'role="img" aria-label="topology">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0L10,5L0,10z"/></marker></defs>'
        + "".join(lines)
        + "".join(nodes)
        + "</svg>"
    )
