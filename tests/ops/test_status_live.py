"""`cortex-flow status` while the flow files are broken, and how it prints for people."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from projects import write_project
from redis_servers import free_port
from rich.console import Console

from cortex_flow.cli import cli
from cortex_flow.cli.views import render
from cortex_flow.flow.loader import load_project
from cortex_flow.runtime.runner import Runner

FLOWS = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      odd: {key: "{P}nc:x:s"}
    groups:
      workers:
        stream: tasks
        routes: [{drop: true}]
"""


def _project(tmp_path: Path, url: str, prefix: str, admin: str) -> Path:
    config = f"redis: {{url: '{url}'}}\nrunner: {{name: live}}\nreload: {{watch: false}}\n"
    config += f"admin: {{listen: '{admin}'}}\n"
    return write_project(tmp_path, FLOWS, config=config, prefix=prefix)


def _break(tmp_path: Path) -> None:
    flows = tmp_path / "flows" / "main.yaml"
    flows.write_text(
        flows.read_text() + "  more:\n    stream: nowhere\n    routes: [{drop: true}]\n"
    )


async def test_status_shows_the_running_topology_while_the_files_are_invalid(
    tmp_path: Path, redis_url: str, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With an invalid edit on disk, status shows the live state from Redis and the
    running runner, the rejected edit first among the problems; --json prints JSON."""
    config = _project(tmp_path, redis_url, key_prefix, f"127.0.0.1:{free_port()}")
    runner = Runner(load_project(config), watcher=None, block=0.2)
    await runner.start()
    try:
        _break(tmp_path)
        assert await asyncio.to_thread(cli, "status", "--json", "--config", str(config)) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["problems"][0].startswith("the flow files on disk are invalid (1 problem)")
        assert data["problems"][1].startswith("rejected edit: ")
        assert (
            'groups.more.stream: stream "nowhere" is not a declared stream' in data["problems"][1]
        )
        assert len(data["flow_problems"]) == 1
        groups = {g["name"]: g["status"] for g in data["groups"]}
        assert groups == {"workers": "ok"}  # the runner's group, read from Redis
        assert data["runner"]["admin_status"]["reachable"] is True

        assert await asyncio.to_thread(cli, "status", "--config", str(config)) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[1].startswith("  ! the flow files on disk are invalid")
        assert f"{key_prefix}nc:x:s" in out  # printed as written, not as an emoji
    finally:
        await runner.stop(5)


def test_status_without_a_runner_shows_the_valid_part_of_the_files(
    tmp_path: Path, redis_url: str, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No runner answering: the valid part of the files is shown, and the note says so."""
    config = _project(tmp_path, redis_url, key_prefix, "off")
    _break(tmp_path)
    assert cli("status", "--json", "--config", str(config)) == 0
    data = json.loads(capsys.readouterr().out)
    assert any(p.startswith("no runner answered (admin endpoint is off)") for p in data["problems"])
    assert {s["name"] for s in data["streams"]} == {"tasks", "odd"}


def test_status_json_is_json_when_redis_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints a JSON document (exit 1) when Redis cannot be reached."""
    config = _project(tmp_path, "redis://127.0.0.1:1", "t:", "off")
    assert cli("status", "--json", "--config", str(config)) == 1
    data = json.loads(capsys.readouterr().out)
    assert "cannot reach Redis at redis://127.0.0.1:1" in data["error"]


def _data(reload: dict[str, Any] | None) -> dict[str, Any]:
    admin = {"admin": "127.0.0.1:1", "reachable": True, "ready": True, "reload": reload}
    runner = {"name": "r", "heartbeat_age": None, "admin_status": admin}
    return {
        "problems": ["key [bold]x[/bold] :x: stays as written"],
        "streams": [
            {
                "name": "[red]s[/red]",
                "key": "nc:x:s",
                "status": "ok",
                "length": 1,
                "oldest_age": 1.0,
                "newest_age": 1.0,
            }
        ],
        "groups": [],
        "agents": [],
        "dead_letters": [],
        "runner": runner,
    }


def _text(data: dict[str, Any]) -> str:
    console = Console(width=160, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render(data))
    return console.export_text()


def test_last_reload_reads_never_or_an_age() -> None:
    """The last reload is "never" before the first one, else its outcome and age."""
    never: dict[str, Any] = {"last_outcome": None, "last_at": None, "errors": []}
    assert "; last reload never" in _text(_data(never))
    applied = {"last_outcome": "applied", "last_at": time.time() - 300, "last_age": 300.0}
    assert "; last reload applied 5m ago" in _text(_data(applied))
    assert "None" not in _text(_data(never))


def test_user_strings_are_not_read_as_markup(capsys: pytest.CaptureFixture[str]) -> None:
    """A problem holding rich markup or an emoji code prints as written."""
    from cortex_flow.cli.views import wide_console

    wide_console().print(render(_data(None)))
    out = capsys.readouterr().out
    assert "key [bold]x[/bold] :x: stays as written" in out
    assert "[red]s[/red]" in out and "nc:x:s" in out


def test_watch_prints_plain_frames_when_piped(
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--watch piped (not a terminal) prints one plain frame per interval."""
    rounds: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        if seconds != 0.5:
            await real_sleep(seconds)
            return
        rounds.append(seconds)
        if len(rounds) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(asyncio, "sleep", sleep)
    config = _project(tmp_path, redis_url, key_prefix, "off")
    redis.Redis.from_url(redis_url).xadd(f"{key_prefix}tasks", {"n": "1"})
    assert cli("status", "--watch", "--interval", "0.5", "--config", str(config)) == 0
    assert capsys.readouterr().out.count("cortex-flow status · ") == 3
