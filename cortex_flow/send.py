"""``cortex-flow send STREAM JSON``: publish one message the way the flows name it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from cortex_flow.access import connect_project
from cortex_flow.codec import encode
from cortex_flow.errors import UsageError
from cortex_flow.loader import Project, load_project
from cortex_flow.modelerrors import did_you_mean
from cortex_flow.models import StreamSpec
from cortex_flow.topology import key_variables, render_key


def target_key(
    project: Project,
    stream: str,
    *,
    priority: str | None = None,
    agent: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> tuple[str, StreamSpec]:
    """The Redis key a message for ``stream`` goes to; UsageError says what is missing."""
    topo = project.topology
    spec = topo.streams.get(stream)
    if spec is None:
        known = sorted(topo.streams)
        raise UsageError(
            f'"{stream}" is not a declared stream{did_you_mean(stream, known)}'
            f" (declared: {', '.join(known) or 'none'})"
        )
    values: dict[str, str] = dict(extra or {})
    needed = key_variables(spec)
    if "priority" in needed:
        levels = spec.priorities or []
        if priority is None:
            priority = "normal" if "normal" in levels else levels[-1]
        if priority not in levels:
            raise UsageError(f"--priority must be one of {', '.join(levels)}, got {priority!r}")
        values["priority"] = priority
    if "agent" in needed:
        if agent is None:
            raise UsageError(
                f'stream "{stream}" has one key per agent; give --agent '
                f"({', '.join(sorted(topo.agents)) or 'no agents declared'})"
            )
        if agent not in topo.agents:
            raise UsageError(
                f'agent "{agent}" is not declared{did_you_mean(agent, sorted(topo.agents))}'
            )
        values["agent"] = agent
    missing = sorted(needed - set(values))
    if missing:
        raise UsageError(f'stream "{stream}" needs --var {missing[0]}=VALUE')
    return render_key(spec, values), spec


async def publish(client: Any, key: str, spec: StreamSpec, msg: Mapping[str, Any]) -> str:
    entry_id: str = await client.xadd(
        key, encode(spec.codec, msg), maxlen=spec.maxlen, approximate=True
    )
    return entry_id


def command(args: argparse.Namespace) -> int:
    project = load_project(args.config)
    try:
        msg = json.loads(args.json)
    except ValueError as exc:
        raise UsageError(f"JSON argument is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise UsageError('JSON argument must be an object, e.g. \'{"type": "chat"}\'')
    bad = [v for v in args.var if "=" not in v]
    if bad:
        raise UsageError(f"--var takes NAME=VALUE, got {bad[0]!r}")
    extra = dict(v.split("=", 1) for v in args.var)
    key, spec = target_key(
        project, args.stream, priority=args.priority, agent=args.agent, extra=extra
    )

    async def go() -> str:
        client = await connect_project(project, wait=3.0, log=logging.getLogger(__name__))
        try:
            return await publish(client, key, spec, msg)
        finally:
            await client.aclose()

    entry_id = asyncio.run(go())
    print(f"sent {entry_id} to {key}")
    return 0
