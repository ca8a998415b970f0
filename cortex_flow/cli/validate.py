"""``cortex-flow validate``: every problem of flows and config, as text, JSON or GitHub lines."""

from __future__ import annotations

import argparse

from cortex_flow.errors import Problem, UsageError
from cortex_flow.flow.callables import check_imports, importable_from
from cortex_flow.flow.clusterslots import cluster_slot_problems
from cortex_flow.flow.loader import Project, check_project
from cortex_flow.flow.report import format_problems


def _imports(project: Project, origins: list[str]) -> list[Problem]:
    """``--check-imports``: import call targets as ``run`` would, from the config's folder."""
    with importable_from(project.base_dir):
        return check_imports(project.topology, project.config.calls.allow, origins)


def command(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise UsageError(
            f"validate: no such file or folder: {', '.join(missing)}; name flow files or "
            "folders that exist (none: the flows folder of config.yaml)"
        )
    checked = check_project(args.config, args.paths or None)
    problems = checked.problems
    origins: list[str] = []
    if checked.project is not None:  # slots: a problem for validate, a warning for run
        project = checked.project
        problems = cluster_slot_problems(project.topology, project.config.redis.url)
        if args.check_imports:
            problems = [*problems, *_imports(project, origins)]
    if args.format == "text" and origins:  # where each target comes from, then problems
        print("call targets:\n" + "\n".join(f"  {line}" for line in origins))
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
