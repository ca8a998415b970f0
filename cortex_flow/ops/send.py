"""Publishing one message the way the flows name it: the key for a stream, and the XADD."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from cortex_flow.errors import CortexFlowError, NotReplicated
from cortex_flow.flow.loader import Project
from cortex_flow.flow.modelerrors import did_you_mean
from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.slots import PARTITION, PartitionPicker
from cortex_flow.flow.topology import key_variables, render_key
from cortex_flow.runtime import tracing
from cortex_flow.wire.codec import encode


class TargetError(CortexFlowError):
    """A message names no key: an unknown stream, or a priority, agent or key variable
    missing or wrong. ``about`` is which (``stream``, ``priority``, ``agent``, ``var``)
    and ``choices`` what would do, so a caller can say how to give it."""

    def __init__(self, message: str, *, about: str, choices: list[str] | None = None) -> None:
        super().__init__(message)
        self.about = about
        self.choices = choices or []


def target_key(
    project: Project,
    stream: str,
    *,
    priority: str | None = None,
    agent: str | None = None,
    extra: Mapping[str, str] | None = None,
    msg: Mapping[str, Any] | None = None,
) -> tuple[str, StreamSpec]:
    """The Redis key a message for ``stream`` goes to; :class:`TargetError` if none.

    A partitioned stream's partition is picked from ``msg`` (its ``partition_key``), or
    in turn; without ``msg`` there is no one key to name.
    """
    topo = project.topology
    spec = topo.streams.get(stream)
    if spec is None:
        known = sorted(topo.streams)
        raise TargetError(
            f'"{stream}" is not a declared stream{did_you_mean(stream, known)}'
            f" (declared: {', '.join(known) or 'none'})",
            about="stream",
            choices=known,
        )
    values: dict[str, str] = dict(extra or {})
    needed = key_variables(spec)
    if "priority" in needed:
        levels = spec.priorities or []
        if priority is None:
            priority = "normal" if "normal" in levels else levels[-1]
        if priority not in levels:
            raise TargetError(
                f"priority must be one of {', '.join(levels)}, got {priority!r}",
                about="priority",
                choices=list(levels),
            )
        values["priority"] = priority
    if "agent" in needed:
        if agent is None:
            raise TargetError(
                f'stream "{stream}" has one key per agent; name the agent '
                f"({', '.join(sorted(topo.agents)) or 'no agents declared'})",
                about="agent",
                choices=sorted(topo.agents),
            )
        if agent not in topo.agents:
            raise TargetError(
                f'agent "{agent}" is not declared{did_you_mean(agent, sorted(topo.agents))}',
                about="agent",
                choices=sorted(topo.agents),
            )
        values["agent"] = agent
    if PARTITION in needed and PARTITION not in values:
        values[PARTITION] = _partition(stream, spec, msg)
    missing = sorted(needed - set(values))
    if missing:
        raise TargetError(
            f'stream "{stream}" needs a value for the key variable {missing[0]}',
            about="var",
            choices=missing,
        )
    return render_key(spec, values), spec


def _partition(stream: str, spec: StreamSpec, msg: Mapping[str, Any] | None) -> str:
    """``{{ partition }}`` for ``msg``: its partition's hash tag."""
    if msg is None:
        raise TargetError(
            f'stream "{stream}" is spread over {spec.partitions} partitions; a message picks '
            "its partition, so name a message (or read the stream through a group)",
            about="partition",
        )
    try:
        return picker(spec.partitions or 1, spec.partition_key).tag(msg)
    except Exception as exc:  # a field the partition_key needs is missing, ...
        raise TargetError(
            f'stream "{stream}": partition_key "{spec.partition_key}" cannot be rendered for '
            f"this message ({exc}); give the message that field",
            about="partition",
        ) from None


@lru_cache(maxsize=256)
def picker(partitions: int, partition_key: str | None) -> PartitionPicker:
    """One picker per partitioning (its round-robin turn is shared by every producer here)."""
    return PartitionPicker(partitions, partition_key)


async def publish(
    client: Any,
    key: str,
    spec: StreamSpec,
    msg: Mapping[str, Any],
    *,
    replicas: int = 0,
    wait_ms: int = 1000,
) -> str:
    """XADD ``msg`` encoded with the stream's codec (never trimmed here: retention does).

    ``replicas``: then WAIT until that many replicas have it, at most ``wait_ms``, or
    raise :class:`NotReplicated`: a failover (Sentinel's is not coordinated) discards a
    write the old master acknowledged and had not passed on, so a producer that must
    not lose a message publishes it again (at least once).
    """
    fields = encode(spec.codec, msg)
    if tracing.setup():  # the OTEL_* variables ask for traces: say where this one starts
        tracing.inject(fields, key)
    if not replicas:
        entry_id: str = await client.xadd(key, fields)
        return entry_id
    pipe = client.pipeline(transaction=False)  # one connection: WAIT covers the XADD
    pipe.xadd(key, fields)
    pipe.execute_command("WAIT", replicas, wait_ms)
    entry_id, acked = await pipe.execute()
    if int(acked) < replicas:
        raise NotReplicated(
            f"{entry_id} on {key} reached {acked} of {replicas} replica(s) within {wait_ms} ms "
            "(a failover under way?); publish it again"
        )
    return str(entry_id)
