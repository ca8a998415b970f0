"""``cortex-flow delayed list|cancel``: the delayed messages waiting in Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import namespace
from cortex_flow.wire.access import connect_project
from cortex_flow.wire.delayed import Delayed, cancel, listing


def command(args: argparse.Namespace) -> int:
    project = load_project(args.config)
    ns = namespace(project.topology)

    async def go() -> Any:
        client = await connect_project(project, wait=3.0)
        try:
            if args.delayed_command == "list":
                return await listing(client, ns)
            return [(ident, await cancel(client, ns, ident)) for ident in args.ids]
        finally:
            await client.aclose()

    result = asyncio.run(go())
    if args.delayed_command == "list":
        found: list[Delayed] = sorted(result, key=lambda d: d.due_ms)
        if args.json:
            print(json.dumps([asdict(d) for d in found], indent=2))
        elif not found:
            print("no delayed messages")
        for d in [] if args.json else found:
            print(f"{d.id}  {_when(d.due_ms)}  {d.key}  {json.dumps(d.fields)}")
        return 0
    missing = [ident for ident, done in result if done is None]
    for ident, done in result:
        if done is not None:
            print(f"cancelled {ident} (was due {_when(done.due_ms)} for {done.key})")
    if missing:
        raise CortexFlowError(
            f"no delayed message {', '.join(missing)}: already delivered or never held; "
            "cortex-flow delayed list shows what waits"
        )
    return 0


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
