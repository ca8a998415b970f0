"""``cortex-flow validate``: every problem of flows and config, as text, JSON or GitHub lines."""

from __future__ import annotations

import argparse
from pathlib import Path

from cortex_flow.errors import Problem
from cortex_flow.flow.callables import check_imports, importable_from
from cortex_flow.flow.clusterslots import cluster_slot_problems
from cortex_flow.flow.declared import Topology
from cortex_flow.flow.loader import check_project
from cortex_flow.flow.report import format_problems


def _imports(topology: Topology, base_dir: Path) -> list[Problem]:
    """``--check-imports``: import call targets as ``run`` would, from the config's folder."""
    with importable_from(base_dir):
        return check_imports(topology)


def command(args: argparse.Namespace) -> int:
    checked = check_project(args.config, args.paths or None)
    problems = checked.problems
    if checked.project is not None:  # slots: a problem for validate, a warning for run
        project = checked.project
        problems = cluster_slot_problems(project.topology, project.config.redis.url)
    if checked.project is not None and args.check_imports:
        problems = [*problems, *_imports(checked.project.topology, checked.project.base_dir)]
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
