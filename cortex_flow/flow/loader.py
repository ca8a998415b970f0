"""Read config.yaml and the flows folder into one validated :class:`Project`.

Pure: reads files, knows nothing of Redis. Every problem of every file is
collected and raised together as :class:`ValidationFailed`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from cortex_flow.errors import Problem, ValidationFailed
from cortex_flow.flow.calltargets import check_call_targets
from cortex_flow.flow.checks import check_topology
from cortex_flow.flow.config import Config
from cortex_flow.flow.declared import Origin, Topology
from cortex_flow.flow.limits import using_limits
from cortex_flow.flow.modelerrors import problems_from
from cortex_flow.flow.models import AgentSpec, FlowFile
from cortex_flow.flow.outbound import check_http_routes
from cortex_flow.flow.source import Document, load_yaml_partial

SECTIONS = ("streams", "agents", "groups")
DEFAULT_CONFIG = "config.yaml"
FLOW_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Project:
    """A validated config plus its topology: what ``run``, ``plan`` and ``graph`` work from."""

    config: Config
    config_path: Path | None
    base_dir: Path
    flows_dir: Path
    topology: Topology


def _validate(model: type[BaseModel], doc: Document, problems: list[Problem], what: str) -> Any:
    start = "start it with version: 1" if model is FlowFile else "write settings as key: value"
    if doc.data is None:
        if model is FlowFile:
            problems.append(Problem(doc.file, 1, 1, "", f"{what} is empty; {start}"))
            return None
        return model.model_validate({})  # an empty config.yaml means all defaults
    if not isinstance(doc.data, dict):
        kinds = {"list": "list", "str": "string", "int": "number", "float": "number"}
        kind = kinds.get(type(doc.data).__name__, type(doc.data).__name__)
        line, col = doc.locate(())
        message = f"{what} must be a mapping (key: value lines) at the top level, got a {kind}"
        problems.append(Problem(doc.file, line, col, "", f"{message}; {start}"))
        return None
    try:
        return model.model_validate(doc.data)
    except ValidationError as exc:
        problems.extend(problems_from(exc, model, doc, doc.data))
        return None


def _read(
    path: Path, display: str, env: Mapping[str, str], problems: list[Problem]
) -> Document | None:
    """The file's document, when it could be read; its problems go to ``problems``."""
    try:
        doc, found = load_yaml_partial(path, display=display, env=env)
    except OSError as exc:
        problems.append(Problem(display, 1, 1, "", f"cannot read file: {exc.strerror or exc}"))
        return None
    problems.extend(found)
    return doc


_STREAM_NAME = re.compile(r"^[ \t]+([A-Za-z][A-Za-z0-9_.-]*)[ \t]*:")


def _stream_names(path: Path) -> set[str]:
    """Names under a block ``streams:`` of a file that could not be parsed (best effort).

    So that a reference to one is not reported as unknown while the file is broken.
    """
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return set()
    names: set[str] = set()
    inside, indent = False, None
    for line in lines:
        if line[:1] not in ("", " ", "\t", "#"):
            inside, indent = line.split("#")[0].strip() == "streams:", None
            continue
        found = _STREAM_NAME.match(line)
        if inside and found:
            width = len(line) - len(line.lstrip())
            indent = width if indent is None else indent
            if width == indent:
                names.add(found.group(1))
    return names


def _salvage(data: Any, topo: Topology, doc: Document, problems: list[Problem]) -> None:
    """Merge the entries of an invalid flow file that are valid on their own.

    The file's problems are already reported; the valid entries still take part in the
    cross-file checks, and the streams of invalid ones count as declared (unsure).
    """
    if not isinstance(data, dict):
        return
    for section in SECTIONS:
        entries = data.get(section)
        if not isinstance(entries, dict):
            continue
        for name, value in entries.items():
            try:
                part = FlowFile.model_validate({"version": 1, section: {name: value}})
            except ValidationError:
                if section == "streams":
                    topo.unsure_streams.add(str(name))
                continue
            _merge(topo, part, doc, problems)
    if data.get("heartbeats") is not None:
        try:
            part = FlowFile.model_validate({"version": 1, "heartbeats": data["heartbeats"]})
        except ValidationError:
            return
        _merge(topo, part, doc, problems)


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
    problems: list[Problem] = []
    topo = _load_topology(paths, os.environ if env is None else env, problems)
    if problems:
        raise ValidationFailed(problems)
    return topo


def _load_topology(
    paths: Sequence[Path], env: Mapping[str, str], problems: list[Problem]
) -> Topology:
    """Every file checked as far as it can be, then the cross-file rules over what was read.

    A file that cannot be parsed does not hide the other files' problems, and an invalid
    entry does not hide the problems of the valid ones.
    """
    topo = Topology()
    for path in flow_paths(paths):
        display = _display(path)
        topo.files.append(display)
        doc = _read(path, display, env, problems)
        if doc is None:
            topo.unsure_streams |= _stream_names(path)
            continue
        if doc.data is not None and isinstance(doc.data, dict):
            try:
                flow = FlowFile.model_validate(doc.data)
            except ValidationError as exc:
                problems.extend(problems_from(exc, FlowFile, doc, doc.data))
                _salvage(doc.data, topo, doc, problems)
                continue
        else:
            flow = _validate(FlowFile, doc, problems, "flow file")
            if flow is None:
                continue
        for name, agent in flow.agents.items():
            if agent is not None and agent.token is not None:
                _token_from_environment(path, doc, problems, ("agents", name, "token"))
        _merge(topo, flow, doc, problems)
    problems.extend(check_topology(topo))
    return topo


def _twice(doc: Document, path: tuple[str, ...], what: str, first: Origin, fix: str) -> Problem:
    line, col = doc.key_position(path)
    return Problem(
        doc.file, line, col, ".".join(path), f"{what} is defined twice: here and at {first}; {fix}"
    )


def _merge(topo: Topology, flow: FlowFile, doc: Document, problems: list[Problem]) -> None:
    for section in SECTIONS:
        target: dict[str, Any] = getattr(topo, section)
        for name, spec in getattr(flow, section).items():
            if name in target:
                first = topo.origins[(section, name)]
                what = f'{section[:-1]} "{name}"'
                problems.append(_twice(doc, (section, name), what, first, "rename or remove one"))
                continue
            target[name] = spec if spec is not None else AgentSpec()
            topo.origins[(section, name)] = Origin(doc, (section, name))
    if flow.heartbeats is not None:
        if topo.heartbeats is not None:
            first = topo.origins[("heartbeats", "")]
            fix = "a topology follows one heartbeat stream, so keep one"
            problems.append(_twice(doc, ("heartbeats",), "heartbeats", first, fix))
        else:
            topo.heartbeats = flow.heartbeats
            topo.origins[("heartbeats", "")] = Origin(doc, ("heartbeats",))


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read a config file; ``None`` means ``./config.yaml`` when present, else all defaults.

    A path given explicitly must exist, whatever its name.
    """
    problems: list[Problem] = []
    config = _load_config(_default_config(path), os.environ if env is None else env, problems)
    if problems:
        raise ValidationFailed(problems)
    return config


def _default_config(path: Path | None) -> Path | None:
    """The config file to read: ``path`` as given, or ``./config.yaml`` when present."""
    if path is not None:
        return path
    default = Path(DEFAULT_CONFIG)
    return default if default.exists() else None


def _load_config(path: Path | None, env: Mapping[str, str], problems: list[Problem]) -> Config:
    if path is None:
        return Config()
    if not path.exists():
        message = "config file not found; check the --config path"
        problems.append(Problem(_display(path), 1, 1, "", message))
        return Config()
    doc = _read(path, _display(path), env, problems)
    config = _validate(Config, doc, problems, "config file") if doc is not None else None
    if isinstance(config, Config) and doc is not None and config.admin.token is not None:
        _token_from_environment(path, doc, problems, ("admin", "token"))
    return config if isinstance(config, Config) else Config()


def _token_from_environment(
    path: Path, doc: Document, problems: list[Problem], where: tuple[str, ...]
) -> None:
    """A token (``admin.token``, ``agents.X.token``) must be a ``${VAR}`` reference: a value
    written in the file is refused."""
    line, col = doc.locate(where)
    field = ".".join(where)
    variable = (
        "CORTEX_ADMIN_TOKEN"
        if where[0] == "admin"
        else re.sub(r"\W", "_", where[1]).upper() + "_TOKEN"
    )
    try:
        raw = path.read_text(encoding="utf-8-sig").split("\n")[line - 1]
    except (OSError, UnicodeDecodeError, IndexError):  # read a moment ago: changed since
        raw = ""
    if not raw[col - 1 :].lstrip("'\"").startswith("${"):
        message = (
            "must come from the environment, not be written in the file (it would end up in "
            f"version control and backups); write {field}: ${{{variable}}} and "
            f"export {variable}"
        )
        problems.append(Problem(doc.file, line, col, field, message))


@dataclass(frozen=True)
class Checked:
    """What reading a project found: the project when valid, every problem, every file read.

    ``partial`` is the project as far as it could be read when the config is valid but
    flows are not (its topology holds the valid entries only; it is not checked), for
    the tools that show live state from what is known (``status``).
    """

    project: Project | None
    problems: list[Problem]
    files: list[str]
    partial: Project | None = None


def check_project(
    config_path: Path | None = None,
    paths: Sequence[Path] | None = None,
    env: Mapping[str, str] | None = None,
) -> Checked:
    """Read and check config and flows; never raises for problems in the user's files.

    ``config_path`` None reads ``./config.yaml`` when present and uses all defaults when
    not; a path given explicitly that does not exist is a problem.
    """
    env = os.environ if env is None else env
    config_path = _default_config(config_path)
    problems: list[Problem] = []
    config = _load_config(config_path, env, problems)
    config_ok = not problems
    found = config_path if config_path is not None and config_path.exists() else None
    files = [_display(found)] if found is not None else []
    base_dir = (config_path or Path(DEFAULT_CONFIG)).resolve().parent
    flows_dir = Path(config.flows)
    if not flows_dir.is_absolute():
        flows_dir = base_dir / flows_dir
    targets = list(paths) if paths else [flows_dir]
    missing = [p for p in targets if not p.exists()]
    for p in missing:
        what = "flows folder" if p == flows_dir else "file or folder"
        fix = "; create it or set flows: in config.yaml" if p == flows_dir else ""
        problems.append(Problem(_display(p), 1, 1, "", f"no such {what}{fix}"))
    topology = Topology()
    if not missing:
        with using_limits(config.templates.limits()):  # constants are folded under them
            topology = _load_topology(targets, env, problems)
        files.extend(topology.files)
        problems.extend(check_call_targets(topology, config.calls.allow))
        problems.extend(check_http_routes(topology, config.http.allow))
    project = Project(config, found, base_dir, flows_dir, topology)
    if problems:
        return Checked(None, sorted(set(problems)), files, project if config_ok else None)
    return Checked(project, [], files)


def load_project(
    config_path: Path | None = None,
    paths: Sequence[Path] | None = None,
    env: Mapping[str, str] | None = None,
) -> Project:
    """Load config and flows together; problems of both are reported in one error."""
    checked = check_project(config_path, paths, env)
    if checked.project is None:
        raise ValidationFailed(checked.problems)
    return checked.project
