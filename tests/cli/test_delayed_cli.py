"""`cortex-flow send --delay/--at/--idempotency-key` and `cortex-flow delayed list|cancel`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from projects import make_project

from cortex_flow.cli.main import cli

FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
    groups:
      work:
        stream: tasks
        routes: [{drop: true}]
"""


@pytest.fixture
def config(tmp_path: Path, redis_url: str, key_prefix: str) -> Path:
    return make_project(tmp_path, FLOW, url=redis_url, prefix=key_prefix)


@pytest.fixture
def sync_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def test_send_with_delay_holds_the_message_and_delayed_lists_and_cancels_it(
    config: Path, sync_client: redis.Redis, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`send --delay 5m` adds nothing to the stream yet and prints the delayed ID and due
    time; `delayed list` shows it; `delayed cancel ID` removes it; a second cancel fails."""
    assert cli("send", "--config", str(config), "tasks", '{"n": "1"}', "--delay", "5m") == 0
    out = capsys.readouterr().out
    assert out.startswith("delayed ") and f" for {key_prefix}tasks until " in out
    ident = out.split()[1]
    assert sync_client.xlen(f"{key_prefix}tasks") == 0
    assert cli("delayed", "list", "--config", str(config), "--json") == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["id"] == ident and listed["fields"] == {"n": "1"}
    assert listed["key"] == f"{key_prefix}tasks"
    assert cli("delayed", "cancel", "--config", str(config), ident) == 0
    assert capsys.readouterr().out.startswith(f"cancelled {ident} (was due ")
    assert cli("delayed", "cancel", "--config", str(config), ident) == 1
    assert f"no delayed message {ident}: already delivered" in capsys.readouterr().err
    assert cli("delayed", "list", "--config", str(config)) == 0
    assert capsys.readouterr().out == "no delayed messages\n"


def test_send_at_a_time_and_its_usage_errors(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--at` takes ISO 8601 (due then); a bad time, a bad delay or both flags exit 2."""
    when = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    assert cli("send", "--config", str(config), "tasks", "{}", "--at", when.isoformat()) == 0
    due = datetime.fromisoformat(capsys.readouterr().out.split(" until ")[1].strip())
    assert abs((due - when).total_seconds()) < 5  # the server's clock, this machine's
    assert cli("send", "--config", str(config), "tasks", "{}", "--at", "tomorrow") == 2
    assert "--at takes an ISO 8601 time" in capsys.readouterr().err
    assert cli("send", "--config", str(config), "tasks", "{}", "--delay", "5 min") == 2
    assert '--delay "5 min" is not a duration' in capsys.readouterr().err
    args = ("--delay", "1m", "--at", when.isoformat())
    assert cli("send", "--config", str(config), "tasks", "{}", *args) == 2
    assert "give --delay or --at, not both" in capsys.readouterr().err


def test_send_with_an_idempotency_key_adds_once(
    config: Path, sync_client: redis.Redis, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same --idempotency-key twice: one entry, and both print its ID."""
    args = ("send", "--config", str(config), "tasks", '{"n": "1"}', "--idempotency-key", "k1")
    assert cli(*args) == 0
    first = capsys.readouterr().out.split()[1]
    assert cli(*args) == 0
    assert capsys.readouterr().out.split()[1] == first
    assert sync_client.xlen(f"{key_prefix}tasks") == 1
