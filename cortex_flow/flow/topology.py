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
from cortex_flow.flow.models import AgentInbox, AgentSpec, GroupSpec, StreamSpec
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
    client: str | None = None  # the agent whose cortex_flow.Client reads it; None: the runner

    @property
    def by_runner(self) -> bool:
        """Whether the runner consumes this group (else an agent's own client does)."""
        return self.client is None

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
    namespace: str = ""  # where the runners' own keys live (see :func:`namespace`)

    @property
    def runner_key(self) -> str:
        """The stream runners beat on: the heartbeat stream, else ``<namespace>runners``."""
        return self.heartbeat_key or f"{self.namespace}runners"

    def duty_key(self, duty: str) -> str:
        """The lease key of a duty; its fencing counter is this key plus ``:fence``.

        Every duty's keys share one cluster slot (the namespace's hash tag, else the tag
        ``{duty}`` after the namespace), so one script call takes or renews them all; they
        start with the namespace, so an ACL key pattern for the flows' keys covers them.
        """
        ns = self.namespace
        tagged = "{" in ns and "}" in ns.partition("{")[2]
        return f"{ns}duty:{duty}" if tagged else f"{ns}{{duty}}:{duty}"

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


def inbox_group(topology: Topology, agent: str, inbox: AgentInbox) -> ResolvedGroup:
    """The group an agent's client reads (``agents.X.inbox``), as the runner's groups are
    described: ``run`` creates it, ``status`` and ``plan`` show it, the runner does not read it.
    """
    spec = GroupSpec.model_construct(  # a group without routes: the client handles messages
        stream=inbox.stream,
        start=inbox.start,
        retry=inbox.retry,
        dead_letter=inbox.dead_letter,
        vars={"agent": agent},
        routes=[],
        description=f"read by agent {agent}'s client",
    )
    streams = topology.streams
    keys, _ = expand(streams[inbox.stream], inbox.stream, sorted(topology.agents), spec.vars)
    dlq = None
    if inbox.dead_letter is not None and inbox.dead_letter in streams:
        dlq = render_key(streams[inbox.dead_letter], {})
    return ResolvedGroup(inbox.group or agent, spec, inbox.stream, keys, agent, dlq, agent)


def namespace(topology: Topology) -> str:
    """The prefix the runners' own keys share with the flows' streams.

    The longest prefix common to every stream key's fixed start, cut after its last
    ``:`` (``cortex:tasks:{{ priority }}`` and ``cortex:events`` give ``cortex:``);
    ``cortex-flow:`` when the keys share none.
    """
    starts = [spec.key.partition("{{")[0] for spec in topology.streams.values()]
    if not starts:
        return "cortex-flow:"
    common = starts[0]
    for start in starts[1:]:
        while not start.startswith(common):
            common = common[:-1]
    cut = common.rfind(":")
    return common[: cut + 1] if cut >= 0 else "cortex-flow:"


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
    for agent, agent_spec in sorted(topology.agents.items()):
        declared = agent_spec.inbox
        if declared is not None and declared.stream in topology.streams:
            inbox = inbox_group(topology, agent, declared)
            groups.setdefault(inbox.name, inbox)
    heartbeat_key = None
    if topology.heartbeats is not None:
        heartbeat_key = render_key(topology.streams[topology.heartbeats.stream], {})
    return Resolved(
        runner,
        streams,
        groups,
        dict(topology.agents),
        heartbeat_key,
        topology,
        namespace(topology),
    )


def wrong_type_problem(resolved: Resolved, key: str, held: str) -> str:
    """One line for a declared key that holds a ``held`` instead of a stream.

    It names the stream declaration (``file:line:col`` when known) and the fix.
    """
    found = resolved.keys().get(key)
    name = found.stream if found is not None else None
    if name is None:
        readers = (g.stream for g in resolved.groups.values() for k in g.keys if k.key == key)
        name = next(readers, "")
    origin = resolved.topology.origins.get(("streams", name))
    where = f"{origin}: " if origin is not None else ""
    return (
        f"{where}streams.{name}: key {key} holds a {held}, not a stream; rename or delete "
        f"that key in Redis, or change streams.{name}.key"
    )


def unread_inboxes(resolved: Resolved) -> dict[str, list[str]]:
    """Agents none of whose inbox keys any group reads (the runner's or a client's): their
    keys. Messages sent to them wait there for a reader that does not exist."""
    read = {k.key for g in resolved.groups.values() for k in g.keys}
    keys: dict[str, list[str]] = {}
    for stream in resolved.streams.values():
        for k in stream.keys:
            if k.agent is not None:
                keys.setdefault(k.agent, []).append(k.key)
    return {a: ks for a, ks in sorted(keys.items()) if not read.intersection(ks)}


def no_reader(agent: str, keys: list[str]) -> str:
    """Why an agent's inbox is not read, and what to add."""
    return (
        f"agent {agent}: nothing reads its inbox {', '.join(keys)}: no group reads it and "
        f"agents.{agent} declares no inbox:; add inbox: {{dead_letter: dlq}} to agents.{agent} "
        f"and read it with cortex_flow.Client, or a group with vars: {{agent: {agent}}}"
    )
