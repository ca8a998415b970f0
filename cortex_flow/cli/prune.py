"""``cortex-flow prune GROUP``: destroy a consumer group no flow declares any more.

Such a group holds retention (its unread and pending entries are never trimmed);
``status`` and ``plan`` list it as stale. Destroying it drops its read position and
its pending entries, so prune asks first (``--yes`` skips the question) and refuses
a group the flows declare.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from cortex_flow.cli.args import load
from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.topology import resolve
from cortex_flow.ops.stale import destroy, read_stale
from cortex_flow.wire.access import connect_project

log = logging.getLogger("cortex_flow.prune")


def _describe(row: dict[str, object]) -> str:
    holds = row["holds"]
    held = f"holds {holds:,} entries" if isinstance(holds, int) else "holds an unknown count"
    unread = "?" if row["lag"] is None else row["lag"]
    return (
        f"{row['key']}: {held} ({row['pending']} pending, {unread} unread), "
        f"{row['consumers']} consumer(s)"
    )


def _confirm(question: str) -> bool:
    print(question, end=" ", flush=True)
    try:
        answer = input()
    except EOFError:
        print()
        return False
    return answer.strip().lower() in ("y", "yes")


def command(args: argparse.Namespace) -> int:
    """Destroy ``args.group`` on every declared key it is found on, after confirmation."""
    project = load(args)
    resolved = resolve(project.topology, project.config.runner.name)
    group = args.group
    if group in resolved.groups:
        origin = resolved.topology.origin("groups", group)
        raise CortexFlowError(
            f"group {group} is declared ({origin}); prune removes only groups no flow "
            "declares: remove it from the flows first"
        )

    async def go() -> int:
        client = await connect_project(project, wait=3.0, log=log)
        try:
            rows = [r for r in await read_stale(client, resolved) if r["name"] == group]
            if not rows:
                raise CortexFlowError(
                    f"no group {group} on the flows' stream keys; `cortex-flow status` lists "
                    "the stale groups there are"
                )
            print(f"group {group} is declared by no flow; it exists on:")
            for row in rows:
                print(f"  {_describe(row)}")
            if not args.yes:
                question = (
                    f"Destroy group {group} on {len(rows)} key(s)? Its read position and "
                    "pending entries are lost for good [y/N]"
                )
                if not _confirm(question):
                    print("nothing destroyed (pass --yes to skip the question)")
                    return 1
            done = await destroy(client, resolved, group, rows)
            print(f"destroyed group {group} on {done} key(s)")
            return 0
        finally:
            await client.aclose()

    return asyncio.run(go())
