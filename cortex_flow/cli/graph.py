"""``cortex-flow graph``: the topology as a Mermaid diagram."""

from __future__ import annotations

import argparse

from cortex_flow.cli.args import load
from cortex_flow.flow.graph import mermaid
from cortex_flow.flow.topology import resolve


def command(args: argparse.Namespace) -> int:
    project = load(args)
    print(mermaid(resolve(project.topology, project.config.runner.name)), end="")
    return 0
