"""`cortex-flow run` on an embedded server, and `cortex-flow send`, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from projects import (
    end,
    lines,
    make_project,
    spawn_runner,
    wait_for_sync,
    write_module,
    write_project,
)
from redis_servers import free_port

from cortex_flow.cli import cli

FLOW = """
    version: 1
    streams:
      tasks:
        key: "{P}tasks:{{ priority }}"
        priorities: [critical, high, normal, low]
      inbox: {key: "{P}messages:{{ agent }}"}
      events: {key: "{P}events", codec: json}
    agents: {harold: {}, planner: {}}
    groups:
      agents:
        stream: tasks
        routes:
          - call: {M}:handle
"""


def _writer(path: Path) -> str:
    return f"""
        def handle(msg):
            with open({str(path)!r}, "a") as out:
                out.write(msg["n"] + "\\n")
    """


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A project folder; an embedded server a failed test left running in it is killed."""
    yield tmp_path
    state = tmp_path / ".cortex" / "embedded.json"
    if state.exists():
        pid = int(json.loads(state.read_text())["pid"])
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_run_embedded_prints_hint_serves_send_and_stops_server(project: Path) -> None:
    """`run` on `embedded` starts a server under .cortex, says how to connect, stops it on exit."""
    handled = project / "handled.txt"
    mod = write_module(project, _writer(handled))
    config = make_project(project, FLOW, url="embedded", prefix="cf:", mod=mod)
    log = project / "runner.log"
    process = spawn_runner(config, log)
    try:
        hint = wait_for_sync(
            lambda: re.search(
                r"embedded Redis listening on (redis://127\.0\.0\.1:\d+).*"
                r"agents connect with CORTEX_REDIS_URL=(\S+)",
                log.read_text(),
            ),
            timeout=30,
            what="the connect hint",
        )
        url = hint.group(1)
        assert hint.group(2) == url
        state = json.loads((project / ".cortex" / "embedded.json").read_text())
        assert state["url"] == url
        server_pid = int(state["pid"])
        assert (project / ".cortex" / "redis").is_dir()

        sent = subprocess.run(
            [sys.executable, "-m", "cortex_flow", "send", "tasks", '{"n": "hello"}'],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sent.returncode == 0, sent.stderr
        assert re.fullmatch(r"sent \d+-\d+ to cf:tasks:normal\n", sent.stdout)
        wait_for_sync(lambda: lines(handled) == ["hello"], timeout=15, what="the sent message")

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        end(process)
    wait_for_sync(lambda: not _alive(server_pid), timeout=10, what="the embedded server to stop")
    assert not (project / ".cortex" / "embedded.json").exists()


@pytest.fixture
def send_project(tmp_path: Path, redis_url: str, key_prefix: str) -> Path:
    mod = write_module(tmp_path, _writer(tmp_path / "unused.txt"))
    return make_project(tmp_path, FLOW, url=redis_url, prefix=key_prefix, mod=mod)


@pytest.fixture
def sync_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _send(config: Path, *args: str) -> int:
    return cli("send", "--config", str(config), *args)


def test_send_defaults_to_normal_priority_and_takes_priority(
    send_project: Path,
    sync_client: redis.Redis,
    key_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`send tasks` publishes to the normal level by default, --priority picks another."""
    assert _send(send_project, "tasks", '{"n": "1", "who": "me"}') == 0
    entry_id = capsys.readouterr().out.split()[1]
    assert sync_client.xrange(f"{key_prefix}tasks:normal") == [(entry_id, {"n": "1", "who": "me"})]
    assert _send(send_project, "tasks", '{"n": "2"}', "--priority", "critical") == 0
    assert capsys.readouterr().out.endswith(f" to {key_prefix}tasks:critical\n")
    assert sync_client.xlen(f"{key_prefix}tasks:critical") == 1


def test_send_to_inbox_needs_a_declared_agent(
    send_project: Path,
    sync_client: redis.Redis,
    key_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A per-agent stream needs --agent naming a declared agent; a typo gets a suggestion."""
    assert _send(send_project, "inbox", '{"text": "hi"}') == 2
    assert "give --agent (harold, planner)" in capsys.readouterr().err
    assert _send(send_project, "inbox", '{"text": "hi"}', "--agent", "harlod") == 2
    assert 'agent "harlod" is not declared; did you mean "harold"?' in capsys.readouterr().err
    assert _send(send_project, "inbox", '{"text": "hi"}', "--agent", "harold") == 0
    assert capsys.readouterr().out.endswith(f" to {key_prefix}messages:harold\n")
    assert sync_client.xlen(f"{key_prefix}messages:harold") == 1


def test_send_usage_errors_exit_2(
    send_project: Path, sync_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unknown streams (with did-you-mean), bad levels and bad JSON are usage errors: exit 2."""
    assert _send(send_project, "taks", "{}") == 2
    err = capsys.readouterr().err
    assert '"taks" is not a declared stream; did you mean "tasks"?' in err
    assert "(declared: events, inbox, tasks)" in err
    assert _send(send_project, "tasks", "{}", "--priority", "urgent") == 2
    assert "--priority must be one of critical, high, normal, low, got 'urgent'" in (
        capsys.readouterr().err
    )
    assert _send(send_project, "tasks", "{not json") == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert _send(send_project, "tasks", "[1, 2]") == 2
    assert "must be an object" in capsys.readouterr().err
    assert cli("send", "--config", str(send_project)) == 2  # missing arguments


def test_send_encodes_with_the_stream_codec(
    send_project: Path, sync_client: redis.Redis, key_prefix: str
) -> None:
    """On a json stream, send stores the message as one `data` field holding the object."""
    assert _send(send_project, "events", '{"type": "ping", "n": 3}') == 0
    [(_, fields)] = sync_client.xrange(f"{key_prefix}events")
    assert fields == {"data": '{"type":"ping","n":3}'}


def test_send_to_unreachable_redis_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """When Redis does not answer, send fails with exit 1 and says what to check."""
    mod = write_module(tmp_path, _writer(tmp_path / "unused.txt"))
    config = make_project(tmp_path, FLOW, url=f"redis://127.0.0.1:{free_port()}", mod=mod)
    assert _send(config, "tasks", "{}") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Redis at redis://127.0.0.1:")
    assert "was not reachable" in err


def test_send_to_embedded_needs_a_running_runner(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With `embedded` and no runner started, send exits 1 and says to start `run` first."""
    mod = write_module(project, _writer(project / "unused.txt"))
    config = make_project(project, FLOW, url="embedded", prefix="cf:", mod=mod)
    assert _send(config, "tasks", "{}") == 1
    err = capsys.readouterr().err
    assert "no embedded Redis is running" in err and "`cortex-flow run`" in err


def test_send_var_without_equals_is_a_usage_error(
    send_project: Path, sync_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--var BAD` (no `=`) is refused with exit 2, not silently dropped."""
    assert _send(send_project, "tasks", "{}", "--var", "BAD") == 2
    assert "--var takes NAME=VALUE, got 'BAD'" in capsys.readouterr().err


def test_send_has_no_old_connect_url_alias() -> None:
    """`send.connect_url` was an unused alias of `access.project_url`; it is gone."""
    import cortex_flow.ops.send as send_module

    assert not hasattr(send_module, "connect_url")


def _run_command(config: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex_flow", "run", "--config", str(config)],
        cwd=config.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_exits_1_at_once_when_the_admin_port_is_in_use(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """A start that fails (admin port taken) ends `run` with the error and exit 1, no hang."""
    mod = write_module(tmp_path, _writer(tmp_path / "handled.txt"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_project(
            tmp_path,
            FLOW,
            config=(
                f"redis: {{url: '{redis_url}'}}\nrunner: {{name: t1}}\nreload: {{watch: false}}\n"
                f"admin: {{listen: '127.0.0.1:{port}'}}\n"
            ),
            prefix=key_prefix,
            mod=mod,
        )
        started = time.monotonic()
        done = _run_command(config)
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 15
    assert done.stderr.splitlines()[-1] == (
        f"error: admin endpoint cannot listen on 127.0.0.1:{port}: address already in use; "
        'set admin.listen to another port or "off"'
    )
    assert "running 1 group(s)" not in done.stderr  # refused before any consumer started


def test_second_runner_with_the_same_name_is_refused(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """`run` under a runner.name another live runner beats with exits 1 and says why."""
    flow = (
        FLOW.replace("      events:", '      heartbeats: {key: "{P}heartbeats"}\n      events:')
        + "    heartbeats: {stream: heartbeats}\n"
    )
    mod = write_module(tmp_path, _writer(tmp_path / "handled.txt"))
    config = make_project(
        tmp_path,
        flow,
        url=redis_url,
        prefix=key_prefix,
        mod=mod,
        name="twin",
        runner_extra=", heartbeat_interval: 1s",
    )
    log = tmp_path / "first.log"
    first = spawn_runner(config, log)
    try:
        wait_for_sync(lambda: "running 1 group(s)" in log.read_text(), 30, "the first runner")
        done = _run_command(config)
        assert done.returncode == 1, done.stderr
        assert re.fullmatch(
            rf"error: runner\.name twin is already used by another runner \(host "
            rf"{re.escape(socket.gethostname())} pid {first.pid}, beat \d+s ago\); give each "
            "runner its own name",
            done.stderr.splitlines()[-1],
        ), done.stderr
        assert "running 1 group(s)" not in done.stderr
        assert first.poll() is None  # the first one runs on
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
        end(first)
    # it said it stopped: the same name may start again at once
    log = tmp_path / "again.log"
    again = spawn_runner(config, log)
    try:
        wait_for_sync(lambda: "running 1 group(s)" in log.read_text(), 30, "the restarted runner")
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=30)
        end(again)
