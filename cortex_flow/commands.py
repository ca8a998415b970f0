"""The pure commands: ``validate``, ``schema``, ``graph`` (no Redis needed)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from cortex_flow.checks import check_imports
from cortex_flow.errors import Problem
from cortex_flow.graph import mermaid
from cortex_flow.loader import Project, Topology, check_project, load_project
from cortex_flow.report import format_problems
from cortex_flow.topology import resolve


def load(args: argparse.Namespace) -> Project:
    """Load the project the arguments name (``--config`` and optional flow paths)."""
    return load_project(args.config, getattr(args, "paths", None) or None)


def _imports(topology: Topology, base_dir: Path) -> list[Problem]:
    """``--check-imports``: import call targets as ``run`` would, from the config's folder."""
    sys.path.insert(0, str(base_dir))
    importlib.invalidate_caches()
    try:
        return check_imports(topology)
    finally:
        sys.path.remove(str(base_dir))


def validate(args: argparse.Namespace) -> int:
    checked = check_project(args.config, args.paths or None)
    problems = checked.problems
    if checked.project is not None and args.check_imports:
        problems = _imports(checked.project.topology, checked.project.base_dir)
    output = format_problems(problems, args.format, checked.files)
    if output:
        print(output)
    if problems:
        return 1
    if args.format == "text" and checked.project is not None:
        topo = checked.project.topology
        count = len(topo.files)
        print(
            f"ok: {count} flow file{'' if count == 1 else 's'}: {len(topo.streams)} streams, "
            f"{len(topo.groups)} groups, {len(topo.agents)} agents"
        )
    return 0


def schema(args: argparse.Namespace) -> int:
    from cortex_flow import schema as schemas  # here: validate need not import the test models

    if args.print_:
        name = f"{args.print_}.schema.json"
        print(schemas.render(schemas.SCHEMAS[name]), end="")
        return 0
    out = args.out or Path(args.config or "config.yaml").resolve().parent / "schemas"
    if args.check:
        stale = schemas.stale(out)
        if stale:
            print(
                f"schemas out of date in {out}: {', '.join(stale)}; run `cortex-flow schema` "
                "to regenerate them",
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
