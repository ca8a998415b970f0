"""``cortex-flow status``: the tables (or JSON) of :func:`cortex_flow.ops.status.snapshot`.

Status is for when things are wrong, so it still works when the flow files on disk are
invalid: the topology then comes from the running runner (``GET /topology``), or from the
valid part of the files when no runner answers, and the rejected edit is listed first
among the problems. ``--json`` always prints JSON, errors included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError
from rich.console import RenderableType
from rich.text import Text

from cortex_flow.cli.views import render, wide_console
from cortex_flow.errors import ConnectionFailed, CortexFlowError, UsageError, ValidationFailed
from cortex_flow.flow.declared import Topology
from cortex_flow.flow.exposed import read_doc
from cortex_flow.flow.loader import Project, check_project
from cortex_flow.flow.topology import Resolved, resolve
from cortex_flow.ops.admin import admin_get
from cortex_flow.ops.status import snapshot
from cortex_flow.wire.access import connect_project
from cortex_flow.wire.connection import RedisClient, describe_client, describe_error


@dataclass
class _View:
    """What status shows: the project, its resolved topology, problems to put first."""

    project: Project
    resolved: Resolved
    first: list[str] = field(default_factory=list)  # the rejected edit, and where from
    flow_problems: list[str] = field(default_factory=list)


def _usable(topology: Topology, runner: str) -> Resolved:
    """The valid part of invalid files, resolved: groups whose streams are all known."""
    streams = topology.streams
    groups = {
        name: g
        for name, g in topology.groups.items()
        if g.stream in streams and (g.dead_letter is None or g.dead_letter in streams)
    }
    beats = topology.heartbeats
    known = Topology(
        streams=dict(streams),
        agents=dict(topology.agents),
        groups=groups,
        heartbeats=beats if beats is not None and beats.stream in streams else None,
        origins=topology.origins,
    )
    try:
        return resolve(known, runner)
    except Exception:  # a key template that does not compile: show no streams at all
        return resolve(Topology(), runner)


async def _view(args: argparse.Namespace) -> _View:
    """The project to show; invalid flows fall back to what the runner runs."""
    checked = check_project(args.config)
    if checked.project is not None:
        project = checked.project
        return _View(project, resolve(project.topology, project.config.runner.name))
    if checked.partial is None:  # the config itself is invalid: no Redis to ask
        raise ValidationFailed(checked.problems)
    project = checked.partial
    lines = [str(p) for p in checked.problems]
    count = len(lines)
    first = [
        f"the flow files on disk are invalid ({count} problem{'s' if count != 1 else ''}); "
        "a reload rejects them and the runner keeps what it runs: fix them, then "
        "`cortex-flow validate`"
    ]
    first += [f"rejected edit: {line}" for line in lines]
    status, body = await admin_get(project.config.admin, "/topology")
    if status == 200:
        try:
            name, topology, _ = read_doc(body)
            return _View(project, resolve(topology, name), first, lines)
        except CortexFlowError as exc:
            why = str(exc)
    else:
        why = str(body) if status is None else f"/topology answered {status}"
    first.append(f"no runner answered ({why}): showing the valid part of the files")
    return _View(project, _usable(project.topology, project.config.runner.name), first, lines)


async def _read(client: RedisClient, view: _View) -> dict[str, Any]:
    data = await snapshot(client, view.project, view.resolved)
    data["problems"] = view.first + data["problems"]
    data["flow_problems"] = view.flow_problems
    return data


def _unreachable(client: RedisClient, exc: Exception) -> tuple[str, str]:
    where, why = describe_client(client), describe_error(exc)
    return where, f"Redis at {where} is not reachable ({why})"


async def _watch_json(client: RedisClient, view: _View, interval: float) -> int:
    """``--watch --json``: one JSON document per line and interval, until Ctrl-C.

    A round that cannot reach Redis prints ``{"redis": ..., "error": ...}`` and the
    next round tries again, as the table view does.
    """
    while True:
        doc: dict[str, Any]
        try:
            doc = await _read(client, view)
        except (RedisError, OSError) as exc:
            where, error = _unreachable(client, exc)
            doc = {"redis": where, "error": error, "problems": view.first}
        print(json.dumps(doc), flush=True)
        await asyncio.sleep(interval)


async def _watch_tables(client: RedisClient, view: _View, interval: float) -> int:
    """``--watch``: a live view on a terminal; piped, one plain frame per interval."""
    console = wide_console()

    async def frame() -> RenderableType:
        try:
            return render(await _read(client, view))
        except (RedisError, OSError) as exc:
            _, error = _unreachable(client, exc)
            return Text(f"{error}; retrying every {interval:g}s", style="bold red")

    if not console.is_terminal:
        while True:
            console.print(await frame())
            console.print()
            console.file.flush()
            await asyncio.sleep(interval)
    from rich.live import Live

    with Live(Text("reading…"), console=console, auto_refresh=False) as live:
        while True:
            live.update(await frame(), refresh=True)
            await asyncio.sleep(interval)


async def _main(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError(f"--interval must be a positive number of seconds, got {args.interval:g}")
    try:
        view = await _view(args)
    except ValidationFailed as exc:
        if not args.json:
            raise
        problems = [str(p) for p in exc.problems]
        print(json.dumps({"error": "the config file is invalid", "problems": problems}, indent=2))
        return 1
    try:
        client = await connect_project(view.project)
    except ConnectionFailed as exc:
        if not args.json:
            raise
        print(json.dumps({"error": str(exc), "problems": [*view.first, str(exc)]}, indent=2))
        return 1
    try:
        if args.watch and args.json:
            return await _watch_json(client, view, args.interval)
        if args.watch:
            return await _watch_tables(client, view, args.interval)
        data = await _read(client, view)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            wide_console().print(render(data))
        return 0
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
