"""`status` on flow control: delayed messages waiting, a max_in_flight that limits nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from projects import write_project

from cortex_flow.cli import cli

FLOWS = """version: 1
streams:
  tasks: {{key: "{prefix}tasks"}}
groups:
  work:
    stream: tasks
    concurrency: 8
    max_in_flight: 20
    routes: [{{drop: true}}]
"""


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def config(tmp_path: Path, redis_url: str, key_prefix: str) -> Path:
    settings = f'redis: {{url: "{redis_url}"}}\nrunner: {{name: r1}}\nadmin: {{listen: "off"}}\n'
    return write_project(tmp_path, FLOWS.format(prefix=key_prefix), config=settings)


def test_status_shows_delayed_messages_and_when_the_next_is_due(
    config: Path, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two messages delayed 5m and 10m: one row for their key, 2 waiting, the next due in
    about 5 minutes; the table says so too."""
    for delay in ("5m", "10m"):
        assert cli("send", "--config", str(config), "tasks", "{}", "--delay", delay) == 0
    capsys.readouterr()
    assert cli("status", "--json", "--config", str(config)) == 0
    [row] = json.loads(capsys.readouterr().out)["delayed"]
    assert row["key"] == f"{key_prefix}tasks" and row["waiting"] == 2
    assert 290 <= row["next_due_in"] <= 300
    assert cli("status", "--config", str(config)) in (0, 1)
    out = capsys.readouterr().out
    assert "Delayed messages" in out and "in 4m" in out


def test_a_max_in_flight_above_the_consumers_concurrency_is_a_problem(
    config: Path,
    key_prefix: str,
    r: redis.Redis,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One live consumer of concurrency 8 cannot run 20 at once: status names the place
    and the fix; with three live consumers (24) it says nothing."""
    monkeypatch.chdir(config.parent)
    key = f"{key_prefix}tasks"
    r.xgroup_create(key, "work", id="0", mkstream=True)
    for n in range(3):
        r.xadd(key, {"n": str(n)})
    r.xreadgroup("work", "r1", {key: ">"}, count=1)
    assert cli("status", "--json", "--config", str(config)) == 0
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert (
        "flows/main.yaml:8:20: groups.work.max_in_flight: max_in_flight (20) is above the sum "
        "of concurrency of the 1 runner(s) serving the group (1 x 8 = 8), so it limits "
        "nothing; lower it to 8 or less, or raise concurrency"
    ) in problems
    for name in ("r2", "r3"):
        r.xreadgroup("work", name, {key: ">"}, count=1)
    assert cli("status", "--json", "--config", str(config)) == 0
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert not [p for p in problems if "max_in_flight" in p]
