"""The declared topology: every flow file merged, each name with the place it was defined.

Checks, resolving and the loader all work from :class:`Topology`; :class:`Origin` turns a
path under a definition into a ``file:line:col`` problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cortex_flow.errors import Problem
from cortex_flow.flow.modelerrors import dotted
from cortex_flow.flow.models import AgentSpec, GroupSpec, HeartbeatsSpec, StreamSpec
from cortex_flow.flow.source import Document


@dataclass(frozen=True)
class Origin:
    """Where something was defined, for error messages."""

    doc: Document
    path: tuple[str | int, ...]

    def at(self, *sub: str | int) -> tuple[str, int, int]:
        line, col = self.doc.locate(self.path + sub)
        return self.doc.file, line, col

    def problem(self, sub: Sequence[str | int], message: str, *, at_key: bool = False) -> Problem:
        """A problem at the value under ``sub``, or at its key with ``at_key``."""
        path = self.path + tuple(sub)
        line, col = self.doc.key_position(path) if at_key else self.doc.locate(path)
        return Problem(self.doc.file, line, col, dotted(path), message)

    def __str__(self) -> str:
        line, col = self.doc.key_position(self.path)
        return f"{self.doc.file}:{line}:{col}"


@dataclass
class Topology:
    """All flow files merged: one namespace per section, each name with its origin."""

    streams: dict[str, StreamSpec] = field(default_factory=dict)
    agents: dict[str, AgentSpec] = field(default_factory=dict)
    groups: dict[str, GroupSpec] = field(default_factory=dict)
    heartbeats: HeartbeatsSpec | None = None
    origins: dict[tuple[str, str], Origin] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    # streams declared in an entry or a file that could not be read: already reported,
    # so a reference to one is not reported again as "not a declared stream"
    unsure_streams: set[str] = field(default_factory=set)

    def origin(self, section: str, name: str = "") -> Origin:
        return self.origins[(section, name)]
