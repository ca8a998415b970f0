"""``cortex-flow send STREAM JSON``: publish one message the way the flows name it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from cortex_flow.errors import UsageError
from cortex_flow.flow.loader import load_project
from cortex_flow.ops.send import TargetError, publish, target_key
from cortex_flow.wire.access import connect_project

log = logging.getLogger("cortex_flow.send")

# what the library's target errors are about -> the flag that gives it
FLAGS = {"priority": "--priority", "agent": "--agent", "var": "--var"}


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
    try:
        key, spec = target_key(
            project, args.stream, priority=args.priority, agent=args.agent, extra=extra, msg=msg
        )
    except TargetError as exc:
        raise UsageError(_with_flags(exc)) from None

    async def go() -> str:
        client = await connect_project(project, wait=3.0, log=log)
        try:
            return await publish(client, key, spec, msg)
        finally:
            await client.aclose()

    entry_id = asyncio.run(go())
    print(f"sent {entry_id} to {key}")
    return 0


def _with_flags(exc: TargetError) -> str:
    """The library's words, with the flag that gives what is missing."""
    text = str(exc)
    if exc.about == "priority":
        return f"--{text}"
    if exc.about == "agent":
        return text.replace("name the agent", "give --agent")
    if exc.about == "var":
        return text.split(" needs ")[0] + f" needs --var {exc.choices[0]}=VALUE"
    return text
