"""What several verbs make of their common arguments."""

from __future__ import annotations

import argparse

from cortex_flow.flow.loader import Project, load_project


def load(args: argparse.Namespace) -> Project:
    """Load the project the arguments name (``--config`` and optional flow paths)."""
    return load_project(args.config, getattr(args, "paths", None) or None)
