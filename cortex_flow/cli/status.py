"""``cortex-flow status``: the tables (or JSON) of :func:`cortex_flow.ops.status.snapshot`."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from redis.exceptions import RedisError
from rich.console import RenderableType
from rich.text import Text

from cortex_flow.cli.args import load
from cortex_flow.cli.views import render, wide_console
from cortex_flow.errors import ConnectionFailed, UsageError
from cortex_flow.flow.loader import Project
from cortex_flow.flow.topology import Resolved, resolve
from cortex_flow.ops.status import snapshot
from cortex_flow.wire.access import connect_project
from cortex_flow.wire.connection import RedisClient, describe_client, describe_error


async def _watch_json(
    client: RedisClient, project: Project, resolved: Resolved, interval: float
) -> int:
    """``--watch --json``: one JSON document per line and interval, until Ctrl-C.

    A round that cannot reach Redis prints ``{"redis": ..., "error": ...}`` and the
    next round tries again, as the table view does.
    """
    while True:
        doc: dict[str, Any]
        try:
            doc = await snapshot(client, project, resolved)
        except (RedisError, OSError) as exc:
            where, why = describe_client(client), describe_error(exc)
            doc = {"redis": where, "error": f"Redis at {where} is not reachable ({why})"}
        print(json.dumps(doc), flush=True)
        await asyncio.sleep(interval)


async def _main(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError(f"--interval must be a positive number of seconds, got {args.interval:g}")
    project = load(args)
    resolved = resolve(project.topology, project.config.runner.name)
    client = await connect_project(project)
    try:
        if not args.watch:
            data = await snapshot(client, project, resolved)
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                wide_console().print(render(data))
            return 0
        if args.json:
            return await _watch_json(client, project, resolved, args.interval)
        from rich.live import Live

        with Live(Text("reading…"), console=wide_console(), auto_refresh=False) as live:
            while True:
                view: RenderableType
                try:
                    view = render(await snapshot(client, project, resolved))
                except (RedisError, OSError) as exc:
                    where, why = describe_client(client), describe_error(exc)
                    view = Text(
                        f"Redis at {where} is not reachable ({why}); "
                        f"retrying every {args.interval:g}s",
                        style="bold red",
                    )
                live.update(view, refresh=True)
                await asyncio.sleep(args.interval)
    except (RedisError, OSError) as exc:
        raise ConnectionFailed(
            f"lost Redis at {describe_client(client)} while reading status ({describe_error(exc)})"
        ) from exc
    finally:
        await client.aclose()


def command(args: argparse.Namespace) -> int:
    """``cortex-flow status``; with ``--watch``, Ctrl-C ends it with exit code 0.

    ``--watch --json`` prints one JSON document per interval, one per line.
    """
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        if args.watch:
            return 0
        raise
