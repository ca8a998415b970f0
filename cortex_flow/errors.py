"""Typed errors. The CLI turns these into exit codes; nothing below the CLI exits."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Problem:
    """One problem in a user's file, pointing at the place to fix.

    ``path`` is the dotted field path (``groups.agents.retry.max_deliveries``),
    empty when the problem concerns the whole file.
    """

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class CortexFlowError(Exception):
    """Base class of every error cortex-flow raises on purpose."""


class ValidationFailed(CortexFlowError):
    """Flows or config are invalid; carries every problem found, sorted by place."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = sorted(set(problems))
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} found"
        super().__init__(head + ":\n" + "\n".join(str(p) for p in self.problems))


class ConnectionFailed(CortexFlowError):
    """Redis could not be reached (after retries, where retrying applies)."""


class NotReplicated(CortexFlowError):
    """A publish that was to reach replicas did not within its wait: publish it again
    (it may then be there twice; a failover may discard the first)."""


class UsageError(CortexFlowError):
    """The command line or its arguments are wrong (exit code 2)."""
