"""The ``cortex-flow`` command: one module per verb.

This is the only layer that parses arguments, prints for a person, picks exit codes or
exits the process.
"""

from cortex_flow.cli.main import cli, main

__all__ = ["cli", "main"]
