"""``cortex-flow task STREAM ENTRY_ID`` and ``cortex-flow cancel STREAM ENTRY_ID``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from datetime import UTC, datetime

from cortex_flow.cli.send import target
from cortex_flow.flow.loader import load_project
from cortex_flow.ops.requests import project_prefix
from cortex_flow.ops.tasks import cancel, task_state
from cortex_flow.wire.access import connect_project
from cortex_flow.wire.tasks import TaskState

log = logging.getLogger("cortex_flow.tasks")


def show(args: argparse.Namespace) -> int:
    """Print a task's state; exit 1 when there is none."""
    project = load_project(args.config)
    key, _, _ = target(project, args)

    async def go() -> TaskState:
        redis = await connect_project(project, wait=3.0, log=log)
        try:
            return await task_state(redis, project_prefix(project), key, args.entry_id)
        finally:
            await redis.aclose()

    task = asyncio.run(go())
    if args.format == "json":
        print(json.dumps(task.as_dict()))
        return 0
    when = (
        datetime.fromtimestamp(task.updated / 1000, UTC).isoformat(timespec="seconds")
        if task.updated
        else "-"
    )
    print(f"{task.id} on {task.stream}: {task.state}")
    print(f"  attempts: {task.attempts}   updated: {when}")
    if task.error:
        print(f"  error: {task.error}")
    if task.reply:
        print(f"  reply: {task.reply} (correlation {task.corr})")
    return 0


def cancel_command(args: argparse.Namespace) -> int:
    """Cancel a message; exit 0 either way, saying when it had already ended."""
    project = load_project(args.config)
    key, _, _ = target(project, args)

    async def go() -> tuple[bool, str]:
        redis = await connect_project(project, wait=3.0, log=log)
        try:
            result = await cancel(redis, project_prefix(project), key, args.entry_id)
            return result.canceled, result.state
        finally:
            await redis.aclose()

    canceled, state = asyncio.run(go())
    if canceled:
        print(f"canceled {args.entry_id} on {key}")
    else:
        print(f"{args.entry_id} on {key} already {state}; nothing changed")
    return 0
