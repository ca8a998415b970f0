"""Publishing one message the way the flows name it: the key for a stream, and the XADD."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.loader import Project
from cortex_flow.flow.modelerrors import did_you_mean
from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.topology import key_variables, render_key
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
) -> tuple[str, StreamSpec]:
    """The Redis key a message for ``stream`` goes to; :class:`TargetError` if none."""
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
    missing = sorted(needed - set(values))
    if missing:
        raise TargetError(
            f'stream "{stream}" needs a value for the key variable {missing[0]}',
            about="var",
            choices=missing,
        )
    return render_key(spec, values), spec


async def publish(client: Any, key: str, spec: StreamSpec, msg: Mapping[str, Any]) -> str:
    """XADD ``msg`` encoded with the stream's codec (never trimmed here: retention does)."""
    entry_id: str = await client.xadd(key, encode(spec.codec, msg))
    return entry_id
