"""``cortex-flow status`` against a real Redis server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from projects import write_project
from redis.asyncio import Redis
from redis_servers import free_port
from rich.console import Console

from cortex_flow import Client
from cortex_flow.cli import cli
from cortex_flow.cli.views import humanize, render
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import resolve
from cortex_flow.ops.status import HEARTBEAT_PAGE, collect


def project(
    tmp_path: Path,
    url: str,
    prefix: str,
    *,
    agents: bool = True,
    admin: str = "off",
    beats_codec: str = "raw",
) -> Path:
    """Write config.yaml and one flow file whose keys all start with ``prefix``."""
    agent_part = (
        "agents:\n"
        "  harold: {heartbeat: {interval: 10s}}\n"
        "  planner: {heartbeat: {interval: 1s, timeout: 5s}}\n"
        "heartbeats: {stream: heartbeats}\n"
        if agents
        else ""
    )
    flows = f"""version: 1
streams:
  tasks: {{key: "{prefix}tasks:{{{{ priority }}}}", priorities: [high, low]}}
  inbox: {{key: "{prefix}messages:{{{{ agent }}}}"}}
  dlq: {{key: "{prefix}dlq"}}
  heartbeats: {{key: "{prefix}heartbeats", codec: {beats_codec}}}
{agent_part}groups:
  agents:
    stream: tasks
    dead_letter: dlq
    routes: [{{drop: true}}]
"""
    config = (
        f'redis: {{url: "{url}"}}\nrunner: {{name: test-runner}}\nadmin: {{listen: "{admin}"}}\n'
    )
    return write_project(tmp_path, flows, config=config)


def status_json(config: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert cli("status", "--json", "--config", str(config)) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def by_key(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return next(row for row in rows if row["key"] == key)


def server_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_missing_streams_are_reported_as_missing(
    tmp_path: Path, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Streams and groups that do not exist yet show as missing, and the command succeeds."""
    config = project(tmp_path, redis_url, prefix, agents=False)
    assert cli("status", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert f"{prefix}tasks:high" in out
    assert "missing" in out
    data = status_json(config, capsys)
    assert by_key(data["streams"], f"{prefix}tasks:high")["status"] == "missing"
    assert by_key(data["groups"], f"{prefix}tasks:high")["status"] == "stream missing"
    assert data["problems"] == []


def test_empty_stream_with_group_shows_zero_counts(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing empty stream has length 0, and its group no pending entries and no lag."""
    r.xgroup_create(f"{prefix}tasks:high", "agents", id="0", mkstream=True)
    data = status_json(project(tmp_path, redis_url, prefix, agents=False), capsys)
    stream = by_key(data["streams"], f"{prefix}tasks:high")
    assert (stream["status"], stream["length"], stream["oldest_age"]) == ("ok", 0, None)
    group = by_key(data["groups"], f"{prefix}tasks:high")
    assert (group["status"], group["pending"], group["lag"], group["consumers"]) == (
        "ok",
        0,
        0,
        [],
    )


def test_populated_stream_shows_length_pending_lag_and_consumers(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """Length, pending, lag and each consumer's pending count come from Redis, with separators."""
    key = f"{prefix}tasks:high"
    pipe = r.pipeline()
    for n in range(1500):
        pipe.xadd(key, {"n": str(n)})
    pipe.execute()
    r.xgroup_create(key, "agents", id="0")
    r.xreadgroup("agents", "worker-1", {key: ">"}, count=3)
    config = project(tmp_path, redis_url, prefix, agents=False)
    data = status_json(config, capsys)
    assert by_key(data["streams"], key)["length"] == 1500
    group = by_key(data["groups"], key)
    assert (group["pending"], group["lag"]) == (3, 1497)
    assert group["oldest_pending_deliveries"] == 1
    assert [(c["name"], c["pending"]) for c in group["consumers"]] == [("worker-1", 3)]
    assert cli("status", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert "1,500" in out and "1,497" in out and "worker-1: 3 pending" in out


def test_missing_group_on_existing_stream_is_a_problem(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stream that exists without the declared group reports the group missing, not an error."""
    r.xadd(f"{prefix}tasks:low", {"n": "1"})
    data = status_json(project(tmp_path, redis_url, prefix, agents=False), capsys)
    assert by_key(data["groups"], f"{prefix}tasks:low")["status"] == "missing"
    assert any("does not exist" in p and f"{prefix}tasks:low" in p for p in data["problems"])


def test_long_idle_pending_entry_is_flagged(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pending entry idle far beyond claim_idle and backoff is called stuck."""
    key = f"{prefix}tasks:high"
    entry_id = r.xadd(key, {"n": "1"})
    r.xgroup_create(key, "agents", id="0")
    r.xreadgroup("agents", "worker-1", {key: ">"})
    r.xclaim(key, "agents", "worker-1", 0, [entry_id], idle=3_600_000)  # as if idle for 1h
    data = status_json(project(tmp_path, redis_url, prefix, agents=False), capsys)
    group = by_key(data["groups"], key)
    assert group["stale"] is True
    assert group["oldest_pending_idle"] >= 3600
    assert any("is its consumer stuck?" in p for p in data["problems"])


def test_agents_up_down_and_inbox_depth(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent beating within its timeout is up; one silent for longer is down and a problem."""
    hb, now = f"{prefix}heartbeats", server_ms(r)
    r.xadd(hb, {"agent": "planner", "ts": str(now - 60_000)}, id=f"{now - 60_000}-0")
    r.xadd(hb, {"agent": "harold", "ts": str(now - 2_000), "status": "busy"}, id=f"{now - 2000}-0")
    r.xadd(f"{prefix}messages:harold", {"text": "hi"})
    r.xadd(f"{prefix}messages:harold", {"text": "again"})
    config = project(tmp_path, redis_url, prefix)
    data = status_json(config, capsys)
    agents = {a["name"]: a for a in data["agents"]}
    assert agents["harold"]["status"] == "up"
    assert agents["harold"]["reported"] == "busy"
    assert agents["harold"]["inbox"] == 2
    assert agents["planner"]["status"] == "down"
    assert 59 <= agents["planner"]["heartbeat_age"] <= 70
    assert any(p.startswith("agent planner is down") for p in data["problems"])
    assert cli("status", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert "down" in out and "up (busy)" in out


def test_agent_without_heartbeat_is_never_seen(
    tmp_path: Path, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent with a heartbeat policy that never beat shows as never seen."""
    data = status_json(project(tmp_path, redis_url, prefix), capsys)
    assert {a["name"]: a["status"] for a in data["agents"]} == {
        "harold": "never seen",
        "planner": "never seen",
    }


def test_json_heartbeats_are_read_through_the_stream_codec(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``codec: json`` heartbeats, agents beating through the Client (one ``data``
    field) and agents beating plain fields are both shown up, with what they reported."""
    config = project(tmp_path, redis_url, prefix, beats_codec="json")

    async def beat() -> None:
        async with Client.from_config(config, agent="harold") as harold:
            await harold.heartbeat("busy")

    asyncio.run(beat())
    [(_, fields)] = r.xrange(f"{prefix}heartbeats")
    assert set(fields) == {"data"}  # the Client wrote the beat in the stream's codec
    r.xadd(f"{prefix}heartbeats", {"agent": "planner", "ts": str(server_ms(r))})
    agents = {a["name"]: a for a in status_json(config, capsys)["agents"]}
    assert (agents["harold"]["status"], agents["harold"]["reported"]) == ("up", "busy")
    assert agents["planner"]["status"] == "up"


def test_heartbeats_are_searched_past_the_first_page(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent whose last beat is older than a page of other beats is still found."""
    hb = f"{prefix}heartbeats"
    r.xadd(hb, {"agent": "harold", "ts": "0"})
    pipe = r.pipeline()
    for _ in range(HEARTBEAT_PAGE + 200):
        pipe.xadd(hb, {"agent": "planner", "ts": "0"})
    pipe.execute()
    data = status_json(project(tmp_path, redis_url, prefix), capsys)
    assert {a["name"]: a["status"] for a in data["agents"]} == {"harold": "up", "planner": "up"}


def test_dead_letter_depth_is_shown_and_flagged(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-empty dead-letter stream shows its depth and is listed as a problem."""
    for n in range(2):
        r.xadd(f"{prefix}dlq", {"n": str(n), "dlq_error": "boom"})
    config = project(tmp_path, redis_url, prefix, agents=False)
    data = status_json(config, capsys)
    assert data["dead_letters"][0]["key"] == f"{prefix}dlq"
    assert data["dead_letters"][0]["length"] == 2
    assert any("holds 2 dead letter(s)" in p for p in data["problems"])
    assert cli("status", "--config", str(config)) == 0
    assert "Dead letters" in capsys.readouterr().out


def test_json_output_shape(
    tmp_path: Path, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one object with the documented sections and plain values."""
    data = status_json(project(tmp_path, redis_url, prefix), capsys)
    assert set(data) == {
        "redis",
        "now",
        "runner",
        "streams",
        "groups",
        "agents",
        "dead_letters",
        "duties",
        "retention",
        "stale_groups",
        "delayed",
        "problems",
        "flow_problems",
    }
    assert data["redis"].startswith("redis://127.0.0.1")
    assert data["runner"]["name"] == "test-runner"
    assert data["runner"]["admin_status"] == {
        "admin": None,
        "reachable": False,
        "reason": "admin endpoint is off",
    }
    assert set(data["streams"][0]) >= {"name", "key", "status", "length", "oldest_age"}
    assert set(data["agents"][0]) >= {"name", "status", "heartbeat_age", "timeout", "inbox"}


def test_redis_down_exits_1_with_a_clear_message(
    tmp_path: Path, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Redis that does not answer ends with exit 1 and one sentence naming the URL."""
    url = f"redis://127.0.0.1:{free_port()}"
    assert cli("status", "--config", str(project(tmp_path, url, prefix))) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach Redis at {url} (Connection refused)")
    assert "Traceback" not in err


def test_embedded_not_running_is_reported_not_started(
    tmp_path: Path, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With redis.url embedded and no server running, status says so and starts none."""
    assert cli("status", "--config", str(project(tmp_path, "embedded", prefix))) == 1
    assert "no embedded Redis is running" in capsys.readouterr().err
    assert not (tmp_path / ".cortex" / "embedded.json").exists()


@pytest.fixture
def admin_server() -> Iterator[str]:
    """A stand-in runner admin endpoint answering /readyz; yields its host:port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(
                {  # the shape AdminServer's /readyz answers (pinned in test_admin.py)
                    "status": "ready",
                    "detail": {
                        "runner": "r1",
                        "reload": {
                            "last_outcome": "rejected",
                            "last_at": "2024-05-01T10:00:00Z",
                            "errors": ["flows/a.yaml:3:5: groups.x.stream: unknown stream"],
                        },
                        "stuck_calls": {
                            "agents": {"stuck": 4, "max_stuck_calls": 4, "held_back": True}
                        },
                    },
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_runner_readiness_and_reload_errors_come_from_admin(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    admin_server: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The runner section shows /readyz: ready, last reload outcome and its errors; a
    group held back by stuck sync calls is a problem."""
    config = project(tmp_path, redis_url, prefix, agents=False, admin=admin_server)
    data = status_json(config, capsys)
    admin = data["runner"]["admin_status"]
    assert (admin["reachable"], admin["ready"], admin["reload"]["last_outcome"]) == (
        True,
        True,
        "rejected",
    )
    assert cli("status", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert "ready; last reload rejected" in out
    assert "unknown stream" in out
    held_back = (
        "group agents: 4 sync call(s) stuck past their timeout (max_stuck_calls 4); it "
        "starts no new message until one returns"
    )
    assert held_back in data["problems"]
    assert "max_stuck_calls 4" in out


def test_unreachable_runner_is_reported(
    tmp_path: Path, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An admin address nobody answers shows the runner as not reachable."""
    config = project(tmp_path, redis_url, prefix, agents=False, admin=f"127.0.0.1:{free_port()}")
    assert cli("status", "--config", str(config)) == 0
    assert "Runner test-runner: not reachable" in capsys.readouterr().out


def test_watch_redraws_until_ctrl_c(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--watch draws a round per interval and Ctrl-C ends it with exit code 0."""
    rounds: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        if seconds != 0.5:  # someone else's sleep: leave it alone
            await real_sleep(seconds)
            return
        rounds.append(seconds)
        if len(rounds) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(asyncio, "sleep", sleep)
    config = project(tmp_path, redis_url, prefix, agents=False)
    assert cli("status", "--watch", "--interval", "0.5", "--config", str(config)) == 0
    assert rounds == [0.5, 0.5]
    assert f"{prefix}tasks:high" in capsys.readouterr().out


async def test_collect_ages_use_the_given_clock(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    """collect(now=...) measures ages from entry IDs against that clock."""
    key = f"{prefix}tasks:high"
    r.xadd(key, {"n": "1"}, id="1000000-0")
    r.xadd(key, {"n": "2"}, id="1060000-0")
    loaded = load_project(project(tmp_path, redis_url, prefix, agents=False))
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        data = await collect(client, resolve(loaded.topology, "r"), now=1_120.0)
    finally:
        await client.aclose()
    stream = by_key(data["streams"], key)
    assert (stream["oldest_age"], stream["newest_age"]) == (120.0, 60.0)


def test_humanize_reads_at_a_glance() -> None:
    """Ages print as 3s, 4m12s, 2h, 1d3h; sub-second as ms; unknown as a dash."""
    cases = [(3, "3s"), (252, "4m12s"), (7200, "2h"), (7260, "2h1m"), (97200, "1d3h")]
    assert [humanize(s) for s, _ in cases] == [text for _, text in cases]
    assert (humanize(0.25), humanize(0), humanize(None)) == ("250ms", "0s", "-")


def test_problem_free_render_says_all_healthy() -> None:
    """With nothing wrong, the header says all healthy."""
    data: dict[str, Any] = {
        "problems": [],
        "streams": [],
        "groups": [],
        "agents": [],
        "dead_letters": [],
        "runner": {"name": "r", "heartbeat_age": None},
    }
    console = Console(width=120, record=True)
    console.print(render(data))
    assert "all healthy" in console.export_text()


def test_watch_json_prints_one_document_per_interval(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--watch --json prints one JSON document per line and round, until Ctrl-C."""
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
    config = project(tmp_path, redis_url, prefix, agents=False)
    args = ("status", "--watch", "--json", "--interval", "0.5", "--config", str(config))
    assert cli(*args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    docs = [json.loads(line) for line in lines]
    assert all(f"{prefix}tasks:high" in [s["key"] for s in d["streams"]] for d in docs)
    assert all(d["runner"]["name"] == "test-runner" for d in docs)


def test_watch_json_reports_a_lost_redis_as_a_document(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A round that cannot reach Redis is one `{"error": ...}` line; the next round retries."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    import cortex_flow.cli.status as status_module

    real_snapshot, real_sleep = status_module.snapshot, asyncio.sleep
    calls: list[int] = []

    async def snapshot(*args: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RedisConnectionError("connection refused")
        return await real_snapshot(*args)

    async def sleep(seconds: float) -> None:
        if seconds != 0.5:
            await real_sleep(seconds)
        elif len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_module, "snapshot", snapshot)
    monkeypatch.setattr(asyncio, "sleep", sleep)
    config = project(tmp_path, redis_url, prefix, agents=False)
    args = ("status", "--watch", "--json", "--interval", "0.5", "--config", str(config))
    assert cli(*args) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["error"].endswith("is not reachable (connection refused)")
    assert "streams" in second


def test_entries_that_are_not_utf8_do_not_break_status(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """A heartbeat, a task and a dead letter with bytes that are not UTF-8: status still
    answers, the bad beat is not taken for a beat, the good one is (on the previous main
    status failed with UnicodeDecodeError)."""
    hb, now = f"{prefix}heartbeats", server_ms(r)
    with redis.Redis.from_url(redis_url) as raw:
        raw.xadd(hb, {b"agent": b"harold", b"ts": str(now).encode()}, id=f"{now - 1}-0")
        raw.xadd(hb, {b"agent": b"\xffplanner", b"ts": str(now).encode()}, id=f"{now}-0")
        raw.xadd(f"{prefix}tasks:high", {b"text": b"\xfe"})
        raw.xadd(f"{prefix}dlq", {b"text": b"\xfe", b"dlq_error": b"x"})
    config = project(tmp_path, redis_url, prefix)
    data = status_json(config, capsys)
    agents = {a["name"]: a["status"] for a in data["agents"]}
    assert agents == {"harold": "up", "planner": "never seen"}
    assert by_key(data["streams"], f"{prefix}tasks:high")["length"] == 1
    assert cli("status", "--config", str(config)) == 0


async def test_lag_comes_from_entry_ids_when_the_servers_counter_is_wrong(
    tmp_path: Path, redis_url: str, prefix: str, r: redis.Redis
) -> None:
    """A counter left inconsistent (as on a replica promoted by a failover; here
    XGROUP SETID ... ENTRIESREAD 0) makes Redis report lag for a stream its group read to
    the end: status and the metrics gauge say 0, and count what is unread otherwise."""
    from cortex_flow.runtime.gauges import refresh_gauges
    from cortex_flow.runtime.stats import RunnerStats

    if int(str(r.info("server")["redis_version"]).split(".")[0]) < 7:
        pytest.skip("Redis 6.2 keeps no lag counter (XINFO lag, ENTRIESREAD came in 7.0)")
    high, low = f"{prefix}tasks:high", f"{prefix}tasks:low"
    ids = [r.xadd(high, {"n": str(n)}) for n in range(5)]
    for n in range(4):
        r.xadd(low, {"n": str(n)})
    r.xgroup_create(high, "agents", id="0")
    r.xgroup_create(low, "agents", id="0")
    r.execute_command("XGROUP", "SETID", high, "agents", ids[-1], "ENTRIESREAD", "0")
    r.execute_command("XGROUP", "SETID", low, "agents", "0", "ENTRIESREAD", "0")
    r.xadd(low, {"n": "4"})  # the counter is now invalid: more added than it knows read
    reported = {g["name"]: g["lag"] for g in r.xinfo_groups(high)}
    assert reported["agents"] == 5  # what the server says for a stream read to its end
    resolved = resolve(
        load_project(project(tmp_path, redis_url, prefix, agents=False)).topology, "r"
    )
    client = Redis.from_url(redis_url, decode_responses=True)
    stats = RunnerStats("r")
    try:
        data = await collect(client, resolved)
        await refresh_gauges(client, resolved, stats)
    finally:
        await client.aclose()
    lags = {row["key"]: row["lag"] for row in data["groups"]}
    assert lags == {high: 0, low: 5}
    assert stats.lag == {("agents", high): 0, ("agents", low): 5}
