"""What ``run`` or a reload would create, change or remove.

:func:`diff` is pure, in the manner of Vector's ``config/diff.rs``: two resolved topologies
are compared on their serialised values (``model_dump(mode="json")``), never by identity,
and the result is a :class:`Plan` that the runtime applies and ``cortex-flow plan`` prints.
It knows nothing of Redis: :func:`cortex_flow.ops.drift.drift` compares with what is there.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from cortex_flow.flow.config import Config
from cortex_flow.flow.durations import format_duration
from cortex_flow.flow.models import AgentSpec, Route
from cortex_flow.flow.topology import Resolved, ResolvedGroup, StreamKey
from cortex_flow.flow.urls import describe_url

__all__ = ["Change", "Plan", "declared_keys", "describe_route", "diff", "is_secret"]

Kind = Literal["add", "remove", "change", "drift"]
What = Literal["stream", "key", "group", "route", "agent", "setting"]

# Read once at start: a reload that changes one is rejected whole, never half-applied.
RESTART_SETTINGS = (
    "redis.url",
    "runner.name",
    "admin.listen",
    "log.format",
    "flows",
    "reload.watch",
    "runner.duty_lease",
    "runner.retention_interval",
    "runner.dead_consumer_idle",
)
SHOWN_KEYS = 4
HIDDEN = "(value hidden)"
# Values a plan never prints: they end up in logs, in /readyz and on terminals.
_SECRET_NAME = re.compile(r"password|token|secret|authorization|api[-_]?key", re.IGNORECASE)
_HEADERS = re.compile(r"(^|\.)http\.headers(\.|$)")
STREAM_FIELDS = ("key", "priorities", "maxlen", "retention", "codec")


@dataclass(frozen=True)
class Change:
    """One difference, in words: ``group harold: batch 100 -> 50``.

    ``kind`` ``drift`` marks something found in Redis that the flows do not declare;
    ``run`` leaves it alone, so it is informational.
    """

    kind: Kind
    what: What
    name: str
    detail: str

    @property
    def subject(self) -> str:
        """What the line is about: a route change reads as a change of its group."""
        return "group" if self.what == "route" else self.what

    def __str__(self) -> str:
        return f"{self.subject} {self.name}: {self.detail}"


@dataclass(frozen=True)
class Plan:
    """The changes between two topologies and what the runtime must do about them.

    ``groups_to_restart`` had settings other than routes changed (stream and keys, start,
    concurrency, batch, priority, weights, retry, dead letter, vars, consumer, or the codec
    of a stream they read or dead-letter to); ``groups_routes_only`` had only their route
    table change (routes, a route's target stream, or the set of agents): the runtime swaps
    it in place. ``restart_required`` names settings a running runner cannot change; a
    reload with any of them must be rejected whole.
    """

    changes: tuple[Change, ...] = ()
    groups_to_add: tuple[str, ...] = ()
    groups_to_remove: tuple[str, ...] = ()
    groups_to_restart: tuple[str, ...] = ()
    groups_routes_only: tuple[str, ...] = ()
    keys_to_create: tuple[str, ...] = ()
    restart_required: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """True when there is nothing to apply (drift alone is informational)."""
        return not self.restart_required and all(c.kind == "drift" for c in self.changes)

    @property
    def heartbeats_changed(self) -> bool:
        """True when agents or the heartbeats section changed: the monitor must reload."""
        return any(
            c.what == "agent" or (c.what == "setting" and c.name == "heartbeats")
            for c in self.changes
        )

    def summary(self) -> dict[str, int]:
        """How many changes of each kind: create, change, remove, drift."""
        counts = Counter(c.kind for c in self.changes)
        return {
            "create": counts["add"],
            "change": counts["change"],
            "remove": counts["remove"],
            "drift": counts["drift"],
        }


def _dump(model: BaseModel | None, *drop: str) -> Any:
    if model is None:
        return None
    data = model.model_dump(mode="json", by_alias=True)
    for name in drop:
        data.pop(name, None)
    return data


def is_secret(path: str) -> bool:
    """True for a value under ``http.headers`` or a key named like a credential."""
    return bool(_HEADERS.search(path) or _SECRET_NAME.search(path.rpartition(".")[2]))


def _show(value: Any, path: str = "") -> str:
    """``value`` in words, with secrets hidden and passwords cut out of URLs."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v, path) for v in value) + "]"
    if isinstance(value, dict):
        shown = []
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            shown.append(f"{key}: {HIDDEN if is_secret(sub) else _show(item, sub)}")
        return "{" + ", ".join(shown) + "}"
    text = str(value)
    return describe_url(text) if "://" in text else text


def _differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Leaf-level differences of two JSON values, as ``(dotted.path, old, new)``."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in dict.fromkeys([*old, *new]):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [(path, old, new)]


def _change_text(path: str, old: Any, new: Any) -> str:
    """``path old -> new``, or ``path changed (value hidden)`` for a secret."""
    if is_secret(path):
        return f"{path} changed {HIDDEN}"
    return f"{path} {_show(old, path)} -> {_show(new, path)}"


def _changed(old: Any, new: Any) -> list[str]:
    return [_change_text(path, a, b) for path, a, b in _differences(old, new)]


def _keys_text(keys: list[str]) -> str:
    shown = keys[:SHOWN_KEYS]
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(shown) + more


def describe_route(route: Route) -> str:
    """A route in one line: ``when msg.type == 'batch' -> call workers.batch:run``."""
    if route.to is not None:
        action = f"to {route.to}" + (f" {_show(route.vars)}" if route.vars else "")
        if route.set is not None:
            action += f" with set {_show(list(route.set))}"
    elif route.call is not None:
        action = f"call {route.call.function}"
    elif route.http is not None:
        action = f"http {route.http.method} {describe_url(route.http.url)}"
    elif route.a2a is not None:
        action = f"a2a {describe_url(route.a2a.url)}"
    else:
        action = "drop"
    text = f"{f'when {route.when}' if route.when else 'always'} -> {action}"
    text += ", continue" if route.continue_ else ""
    return f"{route.name}: {text}" if route.name else text


def _route_changes(group: str, old: list[Route], new: list[Route]) -> list[Change]:
    out = []
    for index in range(max(len(old), len(new))):
        n = f"routes[{index}]"  # as validate spells it
        if index >= len(old):
            out.append(Change("add", "route", group, f"added {n} ({describe_route(new[index])})"))
        elif index >= len(new):
            text = f"removed {n} ({describe_route(old[index])})"
            out.append(Change("remove", "route", group, text))
        elif (a := _dump(old[index])) != (b := _dump(new[index])):
            if old[index].action == new[index].action:
                text = f"changed {n}: " + "; ".join(_changed(a, b))
            else:
                was, now = describe_route(old[index]), describe_route(new[index])
                text = f"changed {n}: ({was}) is now ({now})"
            out.append(Change("change", "route", group, text))
    return out


def _fields(old: BaseModel, new: BaseModel, *drop: str) -> tuple[list[str], bool]:
    """The changed fields in words, and whether more than the description changed."""
    texts = _changed(_dump(old, "description", *drop), _dump(new, "description", *drop))
    material = bool(texts)
    if getattr(old, "description", None) != getattr(new, "description", None):
        texts.append("description changed")
    return texts, material


def _group_changes(
    old: ResolvedGroup, new: ResolvedGroup, restreamed: dict[str, set[str]]
) -> tuple[list[Change], bool]:
    """The changes of one group, and whether it must restart (more than its routes)."""
    texts, restart = _fields(old.spec, new.spec, "routes")
    old_keys, new_keys = [k.key for k in old.keys], [k.key for k in new.keys]
    more = [f"now also reads {k}" for k in new_keys if k not in old_keys]
    more += [f"no longer reads {k}" for k in old_keys if k not in new_keys]
    if old.client != new.client:
        more.append(f"read by {_reader(old)} -> {_reader(new)}")
    elif old.consumer != new.consumer:
        more.append(f"consumer {old.consumer} -> {new.consumer}")
    if old.dead_letter != new.dead_letter and old.spec.dead_letter == new.spec.dead_letter:
        more.append(f"dead-letter key {_show(old.dead_letter)} -> {_show(new.dead_letter)}")
    # The consumer decodes what it reads (in priority order) and writes its dead letters
    # itself: such a change of either stream changes the consumer, not only its routes.
    read = restreamed.get(new.stream, set()) & {"key", "priorities", "codec"}
    # retention is applied by the retention duty, never by a consumer
    written = restreamed.get(new.spec.dead_letter or "", set()) - {"maxlen", "retention"}
    restart = restart or bool(more or read or written)
    out = [Change("change", "group", new.name, text) for text in texts + more]
    return out + _route_changes(new.name, old.spec.routes, new.spec.routes), restart


def _reader(group: ResolvedGroup) -> str:
    return "the runner" if group.by_runner else f"agent {group.client}'s client"


def _describe_agent(spec: AgentSpec) -> str:
    beat = spec.heartbeat
    if beat is None:
        return "declared (no heartbeat)"
    every, down = format_duration(beat.interval), format_duration(beat.effective_timeout)
    return f"declared (heartbeat every {every}, down after {down} of silence)"


def _settings(current: Config, target: Config) -> tuple[list[Change], list[str]]:
    changes, restart = [], []
    for path, a, b in _differences(_dump(current), _dump(target)):
        text = f"changed {HIDDEN}" if is_secret(path) else f"{_show(a, path)} -> {_show(b, path)}"
        if path in RESTART_SETTINGS:
            why = f"{path} {text}" if is_secret(path) else f"{path} changed ({text})"
            restart.append(f"{why}: it is read only at start; restart the runner")
            text += " (needs a restart)"
        changes.append(Change("change", "setting", path, text))
    return changes, restart


def _heartbeats(current: Resolved, target: Resolved) -> list[Change]:
    old, new = _dump(current.topology.heartbeats), _dump(target.topology.heartbeats)
    if old == new:
        return []
    if old is None or new is None:
        kind: Kind = "add" if old is None else "remove"
        shown = _show(new or old, "heartbeats")
        return [Change(kind, "setting", "heartbeats", f"{kind}ed {shown}")]
    return [Change("change", "setting", "heartbeats", t) for t in _changed(old, new)]


def _streams(
    current: Resolved | None, target: Resolved, moved_agents: set[str]
) -> tuple[list[Change], list[Change], dict[str, set[str]]]:
    """Stream changes, key changes of added or removed agents, and changed fields by stream."""
    changes: list[Change] = []
    agent_keys: list[Change] = []
    restreamed: dict[str, set[str]] = {}
    old = current.streams if current else {}
    for name, stream in target.streams.items():
        keys = [k.key for k in stream.keys]
        before = old.get(name)
        if before is None:
            where = _keys_text(keys) if keys else f"{stream.spec.key}, keys bound by messages"
            changes.append(Change("add", "stream", name, f"added ({where})"))
            continue
        texts, _ = _fields(before.spec, stream.spec)
        fields = {f for f in STREAM_FIELDS if getattr(before.spec, f) != getattr(stream.spec, f)}
        if fields:
            restreamed[name] = fields
        changes += [Change("change", "stream", name, text) for text in texts]
        old_keys = [k.key for k in before.keys]
        moves: list[tuple[Kind, StreamKey]] = [
            ("add", k) for k in stream.keys if k.key not in old_keys
        ]
        moves += [("remove", k) for k in before.keys if k.key not in keys]
        for kind, k in moves:
            verb = "added" if kind == "add" else "removed (its data stays in Redis)"
            if k.agent is not None and k.agent in moved_agents:
                agent_keys.append(Change(kind, "agent", k.agent, f"{name} {k.key} {verb}"))
            else:
                changes.append(Change(kind, "stream", name, f"key {k.key} {verb}"))
    for name, before in old.items():
        if name not in target.streams:
            where = _keys_text([k.key for k in before.keys]) or before.spec.key
            changes.append(Change("remove", "stream", name, f"removed ({where}); data stays"))
    return changes, agent_keys, restreamed


def _agents(
    old: dict[str, AgentSpec], new: dict[str, AgentSpec], agent_keys: list[Change]
) -> list[Change]:
    changes: list[Change] = []
    for name, spec in new.items():
        if name not in old:
            changes.append(Change("add", "agent", name, _describe_agent(spec)))
            changes += [c for c in agent_keys if c.name == name]
            continue
        texts, _ = _fields(old[name], spec)
        changes += [Change("change", "agent", name, text) for text in texts]
    for name in old:
        if name not in new:
            changes.append(Change("remove", "agent", name, "removed (no longer watched)"))
            changes += [c for c in agent_keys if c.name == name]
    return changes


def declared_keys(resolved: Resolved | None) -> list[str]:
    """Every concrete key of the streams and groups, in declaration order."""
    if resolved is None:
        return []
    group_keys = [k.key for g in resolved.groups.values() for k in g.keys]
    return list(dict.fromkeys([*resolved.keys(), *group_keys]))


def diff(
    current: Resolved | None,
    target: Resolved,
    current_config: Config | None = None,
    target_config: Config | None = None,
) -> Plan:
    """What turning ``current`` into ``target`` adds, removes and changes.

    ``current`` None is a fresh start: everything is an add. Settings are compared only
    when both configs are given.
    """
    changes: list[Change] = []
    restart_required: list[str] = []
    if current_config is not None and target_config is not None:
        changes, restart_required = _settings(current_config, target_config)
    if current is not None:
        changes += _heartbeats(current, target)
    old_agents = current.agents if current else {}
    moved = set(old_agents) ^ set(target.agents)
    stream_changes, agent_keys, restreamed = _streams(current, target, moved)
    changes += stream_changes
    changes += _agents(old_agents, target.agents, agent_keys)

    old_groups = current.groups if current else {}
    added, restart, routes_only = [], [], []
    for name, group in target.groups.items():
        before = old_groups.get(name)
        if before is None:
            added.append(name)
            spec = group.spec
            reads = _keys_text([k.key for k in group.keys]) or spec.stream
            text = (
                f"added (reads {reads}; batch {spec.batch}, concurrency {spec.concurrency}, "
                f"{len(spec.routes)} route(s))"
                if group.by_runner
                else f"added (reads {reads}; {_reader(group)})"
            )
            changes.append(Change("add", "group", name, text))
            continue
        group_changes, needs_restart = _group_changes(before, group, restreamed)
        changes += group_changes
        # The route table is rebuilt when a route, a route's target stream or the set of
        # agents (`msg.to in agents`) changes.
        retargeted = any(restreamed.get(route.to or "") for route in group.spec.routes)
        if needs_restart:
            restart.append(name)
        elif moved or retargeted or any(c.what == "route" for c in group_changes):
            routes_only.append(name)
    removed = [name for name in old_groups if name not in target.groups]
    for name in removed:
        text = "removed (stops consuming; the Redis group and its pending entries stay)"
        changes.append(Change("remove", "group", name, text))
    known = set(declared_keys(current))
    return Plan(
        changes=tuple(changes),
        groups_to_add=tuple(added),
        groups_to_remove=tuple(removed),
        groups_to_restart=tuple(restart),
        groups_routes_only=tuple(routes_only),
        keys_to_create=tuple(k for k in declared_keys(target) if k not in known),
        restart_required=tuple(restart_required),
    )
