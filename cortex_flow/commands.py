"""The pure commands: ``validate``, ``schema``, ``graph`` (no Redis needed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cortex_flow import schema as schemas
from cortex_flow.checks import check_imports
from cortex_flow.errors import ValidationFailed
from cortex_flow.graph import mermaid
from cortex_flow.loader import Project, _display, flow_paths, load_project
from cortex_flow.report import format_problems
from cortex_flow.topology import resolve


def load(args: argparse.Namespace) -> Project:
    """Load the project the arguments name (``--config`` and optional flow paths)."""
    return load_project(args.config, getattr(args, "paths", None) or None)


def validate(args: argparse.Namespace) -> int:
    paths = args.paths or None
    try:
        project = load_project(args.config, paths)
        problems = []
        if args.check_imports:
            sys.path.insert(0, str(project.base_dir))
            problems = check_imports(project.topology)
        files = project.topology.files
    except ValidationFailed as exc:
        problems = exc.problems
        files = [_display(p) for p in flow_paths(paths or [])] or ["flows"]
    output = format_problems(problems, args.format, files)
    if problems:
        print(output)
        return 1
    if args.format == "json":
        print(output)
    elif args.format == "text":
        topo = project.topology
        print(
            f"ok: {len(files)} flow file(s): {len(topo.streams)} streams, {len(topo.groups)} "
            f"groups, {len(topo.agents)} agents"
        )
    return 0


def schema(args: argparse.Namespace) -> int:
    if args.print_:
        name = f"{args.print_}.schema.json"
        print(schemas.render(schemas.SCHEMAS[name]), end="")
        return 0
    out = args.out or Path(args.config).resolve().parent / "schemas"
    if args.check:
        stale = schemas.stale(out)
        if stale:
            print(
                f"schemas out of date in {out}: {', '.join(stale)}; run `cortex-flow schema`",
                file=sys.stderr,
            )
            return 1
        print(f"schemas in {out} are up to date")
        return 0
    for path in schemas.write(out):
        print(f"wrote {path}")
    return 0


def graph(args: argparse.Namespace) -> int:
    project = load(args)
    print(mermaid(resolve(project.topology, project.config.runner.name)), end="")
    return 0
