"""Flow test files (``*.test.yaml``): models, discovery, and loading against a project.

The format is described in :mod:`cortex_flow.testing.flowtest`. Loading is pure (no Redis): every
problem of every file (unknown keys, unknown streams, agents or call targets) is
collected with its ``file:line:col`` and raised together as :class:`ValidationFailed`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator

from cortex_flow.errors import Problem, ValidationFailed
from cortex_flow.flow.durations import Duration
from cortex_flow.flow.loader import Project
from cortex_flow.flow.modelerrors import did_you_mean, dotted, problems_from
from cortex_flow.flow.models import CALL_PATTERN, Model, Name, StreamSpec
from cortex_flow.flow.source import Document, load_yaml
from cortex_flow.flow.topology import key_variables, render_key

TEST_SUFFIXES = (".test.yaml", ".test.yml")
CallTarget = Annotated[str, Field(pattern=CALL_PATTERN)]
Path_ = tuple[str | int, ...]


def _handler(value: str) -> str:
    if value in ("ok", "fail") or re.match(CALL_PATTERN, value):
        return value
    raise ValueError(f'must be ok, fail or a module.path:function to call instead, got "{value}"')


class StreamRef(Model):
    """A declared stream and the variables that pick one of its keys."""

    stream: Name
    priority: str | None = Field(None, description="For a priority stream; default normal.")
    agent: str | None = Field(None, description="For a per-agent stream.")
    vars: dict[Name, str] = Field(default_factory=dict)


class SendStep(StreamRef):
    """A message the case publishes (encoded with the stream's codec)."""

    msg: dict[str, Any] = Field(min_length=1)


class ExpectEntry(StreamRef):
    """An entry that must be on the stream; ``msg`` fields are a subset match."""

    msg: dict[str, Any] | None = Field(None, description="Omitted: any entry will do.")


class ExpectDeadLetter(Model):
    """A dead-lettered message: its error contains ``error``; ``msg`` fields match."""

    error: str | None = None
    group: Name | None = None
    msg: dict[str, Any] | None = None


class ExpectCall(Model):
    """A ``call`` target (``module:function``) or ``http`` route (URL contains) got ``msg``."""

    call: CallTarget | None = None
    http: str | None = None
    msg: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> ExpectCall:
        if (self.call is None) == (self.http is None):
            raise ValueError("give exactly one of call (module:function) or http (URL text)")
        return self


class FlowCase(Model):
    """One test case: send messages, let the runner route them, check where they went."""

    name: str = Field(min_length=1)
    send: list[SendStep] = Field(min_length=1)
    expect: list[ExpectEntry] = Field(default_factory=list)
    calls: list[ExpectCall] = Field(default_factory=list)
    dead_letters: list[ExpectDeadLetter] = Field(default_factory=list)
    pending: int = Field(0, ge=0, description="Entries left unacknowledged at the end.")
    handlers: dict[CallTarget, Annotated[str, AfterValidator(_handler)]] = Field(
        default_factory=dict
    )
    http: Literal["ok", "fail"] = "ok"
    timeout: Duration = Field(5.0, description="Longest wait for the routing to settle.")


class FlowTestFile(Model):
    """A ``*.test.yaml`` file."""

    version: Literal[1]
    cases: list[FlowCase] = Field(min_length=1)


@dataclass
class LoadedCase:
    """A validated case with its place and the Redis keys its steps resolve to."""

    case: FlowCase
    file: str
    line: int
    sends: list[tuple[str, StreamSpec]] = field(default_factory=list)
    expects: list[tuple[str, StreamSpec]] = field(default_factory=list)

    @property
    def keys(self) -> set[str]:
        return {k for k, _ in self.sends} | {k for k, _ in self.expects}


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def discover(project: Project, paths: Sequence[Path]) -> list[Path]:
    """Test files under ``paths`` (files as given, folders searched), or by default
    under the flows folder and ``tests/flows`` next to ``config.yaml``."""
    problems = [
        Problem(_display(p), 1, 1, "", "no such file or folder") for p in paths if not p.exists()
    ]
    if problems:
        raise ValidationFailed(problems)
    roots = list(paths) or [
        p for p in (project.flows_dir, project.base_dir / "tests" / "flows") if p.is_dir()
    ]
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            found.extend(sorted(p for p in root.rglob("*") if p.name.endswith(TEST_SUFFIXES)))
        else:
            found.append(root)
    unique = dict.fromkeys(p.resolve() for p in found)
    return [Path(_display(p)) for p in unique]


class _Checker:
    """Cross-checks a parsed file against the project's topology."""

    def __init__(self, project: Project, doc: Document) -> None:
        self.project = project
        self.doc = doc
        self.problems: list[Problem] = []
        topo = project.topology
        routes = [r for g in topo.groups.values() for r in g.routes]
        self.call_targets = sorted({r.call.function for r in routes if r.call is not None})
        self.has_http = any(r.outbound is not None for r in routes)  # http and a2a
        self.has_dlq = any(g.dead_letter is not None for g in topo.groups.values())

    def problem(self, path: Path_, message: str, key: bool = False) -> None:
        line, col = self.doc.key_position(path) if key else self.doc.locate(path)
        self.problems.append(Problem(self.doc.file, line, col, dotted(path), message))

    def key(self, ref: StreamRef, path: Path_) -> tuple[str, StreamSpec] | None:
        """The Redis key ``ref`` names; a problem at the offending field when it cannot."""
        topo = self.project.topology
        spec = topo.streams.get(ref.stream)
        if spec is None:
            known = sorted(topo.streams)
            self.problem(
                (*path, "stream"),
                f'"{ref.stream}" is not a declared stream{did_you_mean(ref.stream, known)} '
                f"(declared: {', '.join(known) or 'none'})",
            )
            return None
        needed = key_variables(spec)
        values = dict(ref.vars)
        before = len(self.problems)
        if "priority" in needed:
            levels = spec.priorities or []
            priority = ref.priority or ("normal" if "normal" in levels else levels[-1])
            if priority not in levels:
                self.problem(
                    (*path, "priority"),
                    f'must be one of {", ".join(levels)} (stream {ref.stream}), got "{priority}"',
                )
            values["priority"] = priority
        elif ref.priority is not None:
            self.problem((*path, "priority"), f"stream {ref.stream} has no priorities")
        if "agent" in needed:
            agents = sorted(topo.agents)
            if ref.agent is None:
                self.problem(
                    path,
                    f"stream {ref.stream} has one key per agent; add agent: "
                    + (f"one of {', '.join(agents)}" if agents else "(no agents are declared)"),
                )
            elif ref.agent not in topo.agents:
                self.problem(
                    (*path, "agent"),
                    f'"{ref.agent}" is not a declared agent{did_you_mean(ref.agent, agents)}',
                )
            values["agent"] = ref.agent or ""
        elif ref.agent is not None:
            self.problem((*path, "agent"), f"stream {ref.stream} has no per-agent keys")
        missing = sorted(needed - set(values))
        if missing:
            self.problem(path, f"stream {ref.stream} needs vars: {{{missing[0]}: ...}}")
        if len(self.problems) > before:
            return None
        return render_key(spec, values), spec

    def case(self, index: int, case: FlowCase) -> LoadedCase:
        at: Path_ = ("cases", index)
        loaded = LoadedCase(case, self.doc.file, self.doc.locate(at)[0])
        for j, send in enumerate(case.send):
            found = self.key(send, (*at, "send", j))
            if found is not None:
                loaded.sends.append(found)
        for j, expect in enumerate(case.expect):
            found = self.key(expect, (*at, "expect", j))
            if found is not None:
                loaded.expects.append(found)
        for target in case.handlers:
            if target not in self.call_targets:
                self.problem(
                    (*at, "handlers", target),
                    f'"{target}" is not the call target of any route'
                    f"{did_you_mean(target, self.call_targets)} "
                    f"(call targets: {', '.join(self.call_targets) or 'none'})",
                    key=True,
                )
        for j, call in enumerate(case.calls):
            if call.call is not None and call.call not in self.call_targets:
                self.problem(
                    (*at, "calls", j, "call"),
                    f'"{call.call}" is not the call target of any route'
                    f"{did_you_mean(call.call, self.call_targets)}",
                )
            if call.http is not None and not self.has_http:
                self.problem(
                    (*at, "calls", j, "http"), "no route of the flows is an http or a2a route"
                )
        if case.dead_letters and not self.has_dlq:
            self.problem((*at, "dead_letters"), "no group of the flows has a dead_letter stream")
        return loaded


def load_cases(project: Project, files: Sequence[Path]) -> list[LoadedCase]:
    """Parse and check every test file; all problems are raised together."""
    problems: list[Problem] = []
    out: list[LoadedCase] = []
    for path in files:
        display = _display(path)
        try:
            doc = load_yaml(path, display=display)
        except ValidationFailed as exc:
            problems.extend(exc.problems)
            continue
        except OSError as exc:
            problems.append(Problem(display, 1, 1, "", f"cannot read file: {exc.strerror or exc}"))
            continue
        if not isinstance(doc.data, dict):
            what = "empty" if doc.data is None else f"a {type(doc.data).__name__}, not a mapping"
            problems.append(
                Problem(display, 1, 1, "", f"test file is {what}; start it with `version: 1`")
            )
            continue
        try:
            parsed = FlowTestFile.model_validate(doc.data)
        except ValidationError as exc:
            problems.extend(problems_from(exc, FlowTestFile, doc, doc.data))
            continue
        checker = _Checker(project, doc)
        seen: dict[str, int] = {}
        for index, case in enumerate(parsed.cases):
            if case.name in seen:
                checker.problem(
                    ("cases", index, "name"),
                    f'case "{case.name}" is already defined at line {seen[case.name]}; '
                    "give each case its own name",
                )
            seen.setdefault(case.name, doc.locate(("cases", index))[0])
            out.append(checker.case(index, case))
        problems.extend(checker.problems)
    if problems:
        raise ValidationFailed(problems)
    return out
