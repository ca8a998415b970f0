"""Read config.yaml and the flows folder into one validated :class:`Project`.

Pure: reads files, knows nothing of Redis. Every problem of every file is
collected and raised together as :class:`ValidationFailed`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from cortex_flow.config import Config
from cortex_flow.errors import Problem, ValidationFailed
from cortex_flow.modelerrors import dotted, problems_from
from cortex_flow.models import AgentSpec, FlowFile, GroupSpec, HeartbeatsSpec, StreamSpec
from cortex_flow.source import Document, load_yaml

SECTIONS = ("streams", "agents", "groups")
FLOW_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Origin:
    """Where something was defined, for error messages."""

    doc: Document
    path: tuple[str | int, ...]

    def at(self, *sub: str | int) -> tuple[str, int, int]:
        line, col = self.doc.locate(self.path + sub)
        return self.doc.file, line, col

    def problem(self, sub: Sequence[str | int], message: str) -> Problem:
        file, line, col = self.at(*sub)
        return Problem(file, line, col, dotted(self.path + tuple(sub)), message)

    def __str__(self) -> str:
        file, line, col = self.at()
        return f"{file}:{line}:{col}"


@dataclass
class Topology:
    """All flow files merged: one namespace per section, each name with its origin."""

    streams: dict[str, StreamSpec] = field(default_factory=dict)
    agents: dict[str, AgentSpec] = field(default_factory=dict)
    groups: dict[str, GroupSpec] = field(default_factory=dict)
    heartbeats: HeartbeatsSpec | None = None
    origins: dict[tuple[str, str], Origin] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def origin(self, section: str, name: str = "") -> Origin:
        return self.origins[(section, name)]


@dataclass(frozen=True)
class Project:
    """A validated config plus its topology: what ``run``, ``plan`` and ``graph`` work from."""

    config: Config
    config_path: Path | None
    base_dir: Path
    flows_dir: Path
    topology: Topology


def _validate(model: type[BaseModel], doc: Document, problems: list[Problem], what: str) -> Any:
    if doc.data is None:
        problems.append(
            Problem(
                doc.file,
                1,
                1,
                "",
                f"{what} is empty; start it with `version: 1`"
                if what == "flow file"
                else f"{what} is empty",
            )
        )
        return None
    if not isinstance(doc.data, dict):
        kind = type(doc.data).__name__
        problems.append(
            Problem(doc.file, 1, 1, "", f"{what} must be a mapping at the top level, got a {kind}")
        )
        return None
    try:
        return model.model_validate(doc.data)
    except ValidationError as exc:
        problems.extend(problems_from(exc, model, doc, doc.data))
        return None


def _read(
    path: Path, display: str, env: Mapping[str, str], problems: list[Problem]
) -> Document | None:
    try:
        return load_yaml(path, display=display, env=env)
    except ValidationFailed as exc:
        problems.extend(exc.problems)
    except OSError as exc:
        problems.append(Problem(display, 1, 1, "", f"cannot read file: {exc.strerror or exc}"))
    return None


def flow_paths(paths: Sequence[Path]) -> list[Path]:
    """Expand folders into their ``*.yaml``/``*.yml`` files, sorted; files stay as given."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(
                sorted(
                    p
                    for p in path.iterdir()
                    if p.suffix in FLOW_SUFFIXES
                    and p.is_file()
                    and not p.name.endswith((".test.yaml", ".test.yml"))
                )
            )
        else:
            out.append(path)
    return out


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def load_topology(paths: Sequence[Path], env: Mapping[str, str] | None = None) -> Topology:
    """Load flow files (or folders of them) into one checked topology."""
    from cortex_flow.checks import check_topology

    env = os.environ if env is None else env
    problems: list[Problem] = []
    topo = Topology()
    for path in flow_paths(paths):
        display = _display(path)
        topo.files.append(display)
        doc = _read(path, display, env, problems)
        if doc is None:
            continue
        flow = _validate(FlowFile, doc, problems, "flow file")
        if flow is None:
            continue
        _merge(topo, flow, doc, problems)
    if not problems:
        problems.extend(check_topology(topo))
    if problems:
        raise ValidationFailed(problems)
    return topo


def _merge(topo: Topology, flow: FlowFile, doc: Document, problems: list[Problem]) -> None:
    for section in SECTIONS:
        target: dict[str, Any] = getattr(topo, section)
        for name, spec in getattr(flow, section).items():
            origin = Origin(doc, (section, name))
            if name in target:
                first = topo.origins[(section, name)]
                line, col = doc.key_position((section, name))
                problems.append(
                    Problem(
                        doc.file,
                        line,
                        col,
                        f"{section}.{name}",
                        f'{section[:-1]} "{name}" is defined twice: here and at {first}; '
                        "rename or remove one",
                    )
                )
                continue
            target[name] = spec if spec is not None else AgentSpec()
            topo.origins[(section, name)] = origin
    if flow.heartbeats is not None:
        origin = Origin(doc, ("heartbeats",))
        if topo.heartbeats is not None:
            first = topo.origins[("heartbeats", "")]
            line, col = doc.key_position(("heartbeats",))
            problems.append(
                Problem(
                    doc.file,
                    line,
                    col,
                    "heartbeats",
                    f"heartbeats is defined twice: here and at {first}; keep one",
                )
            )
        else:
            topo.heartbeats = flow.heartbeats
            topo.origins[("heartbeats", "")] = origin


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``config.yaml``; a missing default file means all defaults."""
    env = os.environ if env is None else env
    if path is None or not path.exists():
        if path is not None and path.name != "config.yaml":
            raise ValidationFailed([Problem(_display(path), 1, 1, "", "config file not found")])
        return Config()
    problems: list[Problem] = []
    doc = _read(path, _display(path), env, problems)
    config = _validate(Config, doc, problems, "config file") if doc is not None else None
    if problems or config is None:
        raise ValidationFailed(problems)
    assert isinstance(config, Config)
    return config


def load_project(
    config_path: Path | None = None,
    paths: Sequence[Path] | None = None,
    env: Mapping[str, str] | None = None,
) -> Project:
    """Load config and flows together; problems of both are reported in one error."""
    config_path = config_path or Path("config.yaml")
    problems: list[Problem] = []
    try:
        config = load_config(config_path, env)
    except ValidationFailed as exc:
        problems.extend(exc.problems)
        config = Config()
    base_dir = config_path.resolve().parent
    flows_dir = Path(config.flows)
    if not flows_dir.is_absolute():
        flows_dir = base_dir / flows_dir
    targets = list(paths) if paths else [flows_dir]
    topology = Topology()
    missing = [p for p in targets if not p.exists()]
    for p in missing:
        problems.append(Problem(_display(p), 1, 1, "", "no such file or folder"))
    if not missing:
        try:
            topology = load_topology(targets, env)
        except ValidationFailed as exc:
            problems.extend(exc.problems)
    if problems:
        raise ValidationFailed(problems)
    return Project(
        config, config_path if config_path.exists() else None, base_dir, flows_dir, topology
    )
