"""``cortex-flow status`` says who reads each agent's inbox, and why an agent is unwatched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from projects import write_project

from cortex_flow.cli import cli

FLOWS = """\
version: 1
streams:
  inbox: {key: "{P}messages:{{ agent }}"}
  dlq: {key: "{P}dlq"}
  heartbeats: {key: "{P}heartbeats"}
agents:
  harold: {}
  planner: {heartbeat: {interval: 10s}, inbox: {dead_letter: dlq}}
  scout: {}
heartbeats: {stream: heartbeats}
groups:
  harold:
    stream: inbox
    vars: {agent: harold}
    routes: [{drop: true}]
"""


def test_an_inbox_nobody_reads_is_a_problem_that_says_what_to_add(
    tmp_path: Path, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each agent row names its inbox's readers (a group, or the agent's client); an agent
    whose inbox no one reads is a problem with the fix; unwatched says it has no heartbeat."""
    config = write_project(
        tmp_path,
        FLOWS,
        prefix=prefix,
        config=f'redis: {{url: "{redis_url}"}}\nadmin: {{listen: "off"}}\n',
    )
    assert cli("status", "--json", "--config", str(config)) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {a["name"]: a for a in data["agents"]}
    assert {name: row["read_by"] for name, row in rows.items()} == {
        "harold": ["group harold"],
        "planner": ["client (group planner)"],
        "scout": [],
    }
    assert (rows["scout"]["status"], rows["scout"]["why"]) == ("unwatched", "no heartbeat declared")
    assert [p for p in data["problems"] if "nothing reads" in p] == [
        f"agent scout: nothing reads its inbox {prefix}messages:scout: no group reads it and "
        "agents.scout declares no inbox:; add inbox: {dead_letter: dlq} to agents.scout and "
        "read it with cortex_flow.Client, or a group with vars: {agent: scout}"
    ]
    assert cli("status", "--config", str(config)) == 0
    table = capsys.readouterr().out
    assert "unwatched (no heartbeat declared)" in table
    assert "nothing reads its inbox" in table
