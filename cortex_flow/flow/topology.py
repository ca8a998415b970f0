"""The resolved topology: concrete Redis keys, groups and consumers, from validated flows.

A pure function of the flows and the runner name. ``run`` provisions exactly
this, ``plan`` diffs two of these, and ``graph`` draws one.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cortex_flow.flow.declared import Topology
from cortex_flow.flow.models import AgentSpec, GroupSpec, StreamSpec
from cortex_flow.flow.slots import partition_tag
from cortex_flow.flow.templates import Template

EXPANDABLE = ("priority", "agent", "partition")


@lru_cache(maxsize=4096)
def key_template(source: str) -> Template:
    """The compiled template of a key (or any template), one per distinct source."""
    return Template(source)


def key_variables(spec: StreamSpec) -> frozenset[str]:
    """The variables a stream's key template needs."""
    return key_template(spec.key).variables


def render_key(spec: StreamSpec, values: Mapping[str, Any]) -> str:
    """The concrete key of ``spec`` for these variable values."""
    return key_template(spec.key).render_values(values)


@dataclass(frozen=True)
class StreamKey:
    """One concrete Redis key of a stream, with the variables that produced it."""

    stream: str
    key: str
    priority: str | None = None
    agent: str | None = None
    partition: int | None = None  # its index, for a stream with ``partitions``


@dataclass(frozen=True)
class ResolvedStream:
    name: str
    spec: StreamSpec
    keys: tuple[StreamKey, ...]  # every key known before any message arrives
    dynamic: bool  # the key has variables only a message can bind


@dataclass(frozen=True)
class ResolvedGroup:
    """A consumer group on every concrete key it reads (highest priority first)."""

    name: str
    spec: GroupSpec
    stream: str
    keys: tuple[StreamKey, ...]
    consumer: str
    dead_letter: str | None

    def fingerprint(self) -> str:
        """A stable serialisation; two groups with equal fingerprints behave the same."""
        return json.dumps(
            {
                "spec": self.spec.model_dump(mode="json", by_alias=True),
                "keys": [k.key for k in self.keys],
                "dlq": self.dead_letter,
                "consumer": self.consumer,
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class Resolved:
    runner: str
    streams: dict[str, ResolvedStream]
    groups: dict[str, ResolvedGroup]
    agents: dict[str, AgentSpec]
    heartbeat_key: str | None
    topology: Topology = field(compare=False, repr=False)

    def keys(self) -> dict[str, StreamKey]:
        """Every concrete key of every stream, by key."""
        return {k.key: k for s in self.streams.values() for k in s.keys}


def expand(
    spec: StreamSpec, name: str, agents: list[str], bound: Mapping[str, str]
) -> tuple[tuple[StreamKey, ...], bool]:
    """All keys of ``spec`` with ``bound`` fixed and priority/agent expanded.

    Returns the keys and whether variables remain that only a message can bind
    (then no key is listed).
    """
    variables = key_variables(spec)
    free = [v for v in variables if v not in bound]
    if any(v not in EXPANDABLE for v in free):
        return (), True
    axes: list[list[tuple[str, str]]] = []
    if "priority" in free:
        axes.append([("priority", p) for p in spec.priorities or []])
    if "agent" in free:
        axes.append([("agent", a) for a in agents])
    if "partition" in free:
        # outermost: a group's keys come partition by partition, priorities in order
        axes.insert(0, [("partition", str(i)) for i in range(spec.partitions or 1)])
    keys = []
    for combo in itertools.product(*axes):
        values = {**bound, **dict(combo)}
        index = values.get("partition")
        if index is not None:
            values["partition"] = partition_tag(int(index))
        keys.append(
            StreamKey(
                name,
                render_key(spec, values),
                values.get("priority"),
                values.get("agent"),
                None if index is None else int(index),
            )
        )
    return tuple(keys), False


def partitions_of(keys: tuple[StreamKey, ...]) -> list[tuple[StreamKey, ...]]:
    """``keys`` split by partition (one part holding them all when not partitioned)."""
    parts: dict[int | None, list[StreamKey]] = {}
    for key in keys:
        parts.setdefault(key.partition, []).append(key)
    return [tuple(p) for p in parts.values()]


def resolve(topology: Topology, runner: str) -> Resolved:
    """Concrete keys, groups and consumer names for a checked topology."""
    agents = sorted(topology.agents)
    streams = {}
    for name, spec in topology.streams.items():
        keys, dynamic = expand(spec, name, agents, {})
        streams[name] = ResolvedStream(name, spec, keys, dynamic)
    groups = {}
    for name, group in topology.groups.items():
        keys, _ = expand(topology.streams[group.stream], group.stream, agents, group.vars)
        dlq = None
        if group.dead_letter is not None:
            dlq = render_key(topology.streams[group.dead_letter], {})
        groups[name] = ResolvedGroup(name, group, group.stream, keys, runner, dlq)
    heartbeat_key = None
    if topology.heartbeats is not None:
        heartbeat_key = render_key(topology.streams[topology.heartbeats.stream], {})
    return Resolved(runner, streams, groups, dict(topology.agents), heartbeat_key, topology)
