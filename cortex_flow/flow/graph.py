"""The topology as a Mermaid flowchart: streams, groups, routes, agents and the DLQ."""

from __future__ import annotations

import re

from cortex_flow.flow.durations import format_duration
from cortex_flow.flow.flowcontrol import flow_limits
from cortex_flow.flow.models import Route
from cortex_flow.flow.topology import Resolved, key_variables

_ESCAPES = {'"': "#quot;", "<": "#lt;", ">": "#gt;", "|": "#124;"}
_SPECIAL = re.compile("|".join(re.escape(c) for c in _ESCAPES))


def _id(kind: str, name: str) -> str:
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"


def _label(*lines: str) -> str:
    """Lines of text for a node or edge label, escaped for Mermaid, quoted."""
    return '"' + "<br/>".join(_SPECIAL.sub(lambda m: _ESCAPES[m.group()], s) for s in lines) + '"'


def _route_label(index: int, route: Route) -> str:
    head = route.name or f"routes[{index}]"
    cond = f"when {route.when}" if route.when else "always"
    extra = " + continue" if route.continue_ else ""
    return _label(f"{head}: {cond}{extra}")


def mermaid(resolved: Resolved) -> str:
    """Render the resolved topology as a ``flowchart LR`` Mermaid diagram."""
    lines = ["flowchart LR"]
    topo = resolved.topology
    dlq_streams = {g.spec.dead_letter for g in resolved.groups.values() if g.spec.dead_letter}
    for name, stream in resolved.streams.items():
        keys = [k.key for k in stream.keys] or [stream.spec.key]
        shown = keys if len(keys) <= 4 else [*keys[:3], f"... {len(keys) - 3} more"]
        text = _label(name, *shown)
        shape = f"[({text})]" if name not in dlq_streams else f"[/{text}/]"
        lines.append(f"  {_id('s', name)}{shape}")
    for name, group in resolved.groups.items():
        spec = group.spec
        gid = _id("g", name)
        detail = f"{spec.priority}, batch {spec.batch}, x{spec.concurrency}"
        limits = flow_limits(spec)
        if limits:
            detail += f", {limits}"
        if not group.by_runner:
            detail = f"read by agent {group.client}'s client"
        info = _label(f"group {name}", detail)
        lines.append(f"  {gid}{{{{{info}}}}}")
        bound = ", ".join(f"{k}={v}" for k, v in spec.vars.items())
        lines.append(
            f"  {_id('s', spec.stream)} -->{'|' + _label(bound) + '|' if bound else ''} {gid}"
        )
        for index, route in enumerate(spec.routes):
            label = _route_label(index, route)
            if route.to is not None:
                lines.append(f"  {gid} -->|{label}| {_id('s', route.to)}")
                continue
            if route.call is not None:
                node = _id("c", f"{name}_{index}")
                lines.append(f"  {node}[[{_label('call ' + route.call.function)}]]")
            elif route.http is not None:
                node = _id("h", f"{name}_{index}")
                lines.append(f"  {node}>{_label('http ' + route.http.url)}]")
            elif route.a2a is not None:
                node = _id("h", f"{name}_{index}")
                lines.append(f"  {node}>{_label('a2a ' + route.a2a.url)}]")
            else:
                node = _id("d", f"{name}_{index}")
                lines.append(f"  {node}((drop))")
            lines.append(f"  {gid} -->|{label}| {node}")
        if spec.dead_letter:
            lines.append(f'  {gid} -.->|"dead letter"| {_id("s", spec.dead_letter)}')
    inboxes = [n for n, s in resolved.streams.items() if "agent" in key_variables(s.spec)]
    for name, agent in resolved.agents.items():
        aid = _id("a", name)
        beat = (
            [f"beats every {format_duration(agent.heartbeat.interval)}"] if agent.heartbeat else []
        )
        lines.append(f"  {aid}([{_label(f'agent {name}', *beat)}])")
        for inbox in inboxes:
            lines.append(f"  {_id('s', inbox)} -.->|{_label(name)}| {aid}")
        if agent.heartbeat and topo.heartbeats is not None:
            lines.append(f'  {aid} -.->|"heartbeat"| {_id("s", topo.heartbeats.stream)}')
    if topo.heartbeats is not None and topo.heartbeats.on_down is not None:
        hb = _id("s", topo.heartbeats.stream)
        lines.append(f'  {hb} -.->|"agent down/up"| {_id("s", topo.heartbeats.on_down.to)}')
    return "\n".join(lines) + "\n"
