"""The repository's own flows, config and schemas: the reference system, kept valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cortex_flow.cli import cli
from cortex_flow.flow import schema as schemas
from cortex_flow.flow.graph import mermaid
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import resolve

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config.yaml"

REFERENCE_KEYS = {
    "cortex:tasks:critical",
    "cortex:tasks:high",
    "cortex:tasks:normal",
    "cortex:tasks:low",
    "cortex:heartbeats",
    "cortex:tasks:dlq",
    "cortex:messages:harold",
    "cortex:messages:planner",
    "cortex:messages:worker",
    "cortex:events",
}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("CORTEX_REDIS_URL", raising=False)
    monkeypatch.delenv("CORTEX_A2A_URL", raising=False)


def test_repo_flows_validate_without_redis_url(capsys: pytest.CaptureFixture[str]) -> None:
    """With CORTEX_REDIS_URL unset (embedded), the repo's config and flows are valid."""
    assert cli("validate", "--config", str(CONFIG)) == 0
    assert capsys.readouterr().out == "ok: 3 flow files: 5 streams, 4 groups, 3 agents\n"


def test_repo_flows_validate_with_redis_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With CORTEX_REDIS_URL set, the URL is used and everything stays valid."""
    monkeypatch.setenv("CORTEX_REDIS_URL", "redis://127.0.0.1:6379/0")
    assert cli("validate", "--config", str(CONFIG)) == 0
    assert load_project(CONFIG).config.redis.url == "redis://127.0.0.1:6379/0"
    capsys.readouterr()


def test_repo_call_targets_import(capsys: pytest.CaptureFixture[str]) -> None:
    """--check-imports finds every handler of the example flows (agents_example)."""
    assert cli("validate", "--config", str(CONFIG), "--check-imports") == 0
    capsys.readouterr()


def test_checked_in_schemas_match_the_models(capsys: pytest.CaptureFixture[str]) -> None:
    """schemas/*.json equal what `cortex-flow schema` generates; regenerate them if not."""
    assert schemas.stale(REPO / "schemas") == []
    assert cli("schema", "--config", str(CONFIG), "--check") == 0
    capsys.readouterr()


def test_schema_check_fails_on_a_stale_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`schema --check` exits 1 and names the stale file."""
    schemas.write(tmp_path)
    (tmp_path / "flow.schema.json").write_text("{}\n")
    assert cli("schema", "--out", str(tmp_path), "--check") == 1
    assert "flow.schema.json" in capsys.readouterr().err


def test_repo_topology_has_exactly_the_reference_keys_and_groups() -> None:
    """The example flows resolve to the reference system's keys and groups, nothing else."""
    project = load_project(CONFIG)
    resolved = resolve(project.topology, project.config.runner.name)
    assert set(resolved.keys()) == REFERENCE_KEYS
    assert set(resolved.groups) == {"agents", "workers", "harold", "events", "planner"}
    assert [g.name for g in resolved.groups.values() if not g.by_runner] == ["planner"]
    assert [k.key for k in resolved.groups["planner"].keys] == ["cortex:messages:planner"]
    assert [k.key for k in resolved.groups["events"].keys] == ["cortex:events"]
    assert [k.key for k in resolved.groups["agents"].keys] == [
        "cortex:tasks:critical",
        "cortex:tasks:high",
        "cortex:tasks:normal",
        "cortex:tasks:low",
    ]
    assert [k.key for k in resolved.groups["harold"].keys] == ["cortex:messages:harold"]
    assert [k.key for k in resolved.groups["workers"].keys] == ["cortex:messages:worker"]
    assert resolved.heartbeat_key == "cortex:heartbeats"
    assert {g.dead_letter for g in resolved.groups.values()} == {"cortex:tasks:dlq", None}
    # every declared stream has a reader: a group, the runner's heartbeat watch, or dlq list
    read = {g.stream for g in resolved.groups.values()} | {"heartbeats", "dlq"}
    assert read == set(resolved.streams)
    read_keys = {k.key for g in resolved.groups.values() for k in g.keys}
    assert {k.key for k in resolved.streams["inbox"].keys} <= read_keys  # every agent's inbox


def test_graph_draws_every_stream(capsys: pytest.CaptureFixture[str]) -> None:
    """`graph` prints a Mermaid flowchart with a node for every stream and every key."""
    assert cli("graph", "--config", str(CONFIG)) == 0
    out = capsys.readouterr().out
    assert out.startswith("flowchart LR\n")
    project = load_project(CONFIG)
    for name in project.topology.streams:
        assert re.search(rf"^  s_{name}[\[(]", out, re.MULTILINE), name
    for key in REFERENCE_KEYS:
        assert key in out
    assert out == mermaid(resolve(project.topology, project.config.runner.name))
    assert 'g_planner{{"group planner<br/>read by agent planner\'s client"}}' in out
