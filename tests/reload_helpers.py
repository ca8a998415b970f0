"""Helpers for the hot-reload tests: a scripted watcher, a flows project, a producer.

The route handlers below are ``call`` targets of the test flows (``reload_helpers:handle``);
they record every message id they see in :data:`HANDLED`, so a test can account for each
published message exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from redis.exceptions import ConnectionError as RedisConnectionError

from cortex_flow.flow.loader import Project, load_project

# --- handlers (call targets of the test flows) -------------------------------------------


class Handled:
    """Every id handled, how often, and by which handler."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.by: dict[str, Counter[str]] = {}

    def reset(self) -> None:
        self.counts.clear()
        self.by.clear()

    def add(self, tag: str, msg: Mapping[str, Any], *, counted: bool = True) -> None:
        if counted:
            self.counts[msg["id"]] += 1
        self.by.setdefault(tag, Counter())[msg["id"]] += 1

    def tagged(self, tag: str) -> int:
        return sum(self.by.get(tag, Counter()).values())


HANDLED = Handled()


async def handle(msg: Mapping[str, Any]) -> None:
    HANDLED.add("a", msg)


async def handle_b(msg: Mapping[str, Any]) -> None:
    HANDLED.add("b", msg)


async def inbox(msg: Mapping[str, Any]) -> None:
    HANDLED.add("inbox", msg)


async def slow(msg: Mapping[str, Any]) -> None:
    await asyncio.sleep(0.02)
    HANDLED.add("slow", msg)


async def audit(msg: Mapping[str, Any]) -> None:
    """A second group's handler: seen, but not counted as the message's handling."""
    await asyncio.sleep(0.005)  # so a reload finds some of its messages in flight
    HANDLED.add("audit", msg, counted=False)


STALLED: set[str] = set()


async def stall_once(msg: Mapping[str, Any]) -> None:
    """Hang on a message's first delivery (until cancelled); handle it the next time."""
    if msg["id"] not in STALLED:
        STALLED.add(msg["id"])
        await asyncio.sleep(3600)
    HANDLED.add("stall", msg)


# --- a scripted watcher ------------------------------------------------------------------


class ScriptedWatcher:
    """A watcher factory for ``Runner(watcher=...)``: yields whatever the test pushes."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[set[Any] | None] = asyncio.Queue()

    def __call__(self) -> AsyncIterator[set[Any]]:
        return self._changes()

    async def _changes(self) -> AsyncIterator[set[Any]]:
        while (item := await self.queue.get()) is not None:
            yield item

    def push(self, what: str = "flows") -> None:
        """Report one (already debounced) batch of file changes."""
        self.queue.put_nowait({("modified", what)})

    def close(self) -> None:
        self.queue.put_nowait(None)


def reloads(runner: Any) -> int:
    """How many reloads the runner has finished, whatever their outcome."""
    return sum(runner.stats.reload.totals.values())


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(
    project: FlowProject, **options: Any
) -> AsyncIterator[tuple[Any, ScriptedWatcher]]:
    """A started runner on ``project`` with a scripted watcher; stopped at the end."""
    from cortex_flow.runtime.runner import Runner

    HANDLED.reset()
    STALLED.clear()
    watcher = ScriptedWatcher()
    options = {"watcher": watcher, "block": 0.05, "admin": False, **options}
    runner = Runner(project.load(), **options)
    await runner.start()
    try:
        yield runner, watcher
    finally:
        if not runner.stopping:
            await runner.stop()


async def edit(project: FlowProject, runner: Any, watcher: ScriptedWatcher) -> str:
    """Write the project's files, report the change, and wait for the reload's outcome."""
    project.write()
    return await push_and_wait(runner, watcher)


async def push_and_wait(runner: Any, watcher: ScriptedWatcher, timeout: float = 15.0) -> str:
    """Push one change to the watcher and wait for the reload it triggers; its outcome."""
    before = reloads(runner)
    watcher.push()
    await wait_for(lambda: reloads(runner) > before, timeout, "the reload to finish")
    outcome: str = runner.stats.reload.last_outcome
    return outcome


# --- a flows project on disk -------------------------------------------------------------


class FlowProject:
    """``config.yaml`` plus ``flows/`` in a temporary folder, every key under ``prefix``.

    ``streams``, ``agents`` and ``groups`` are plain dicts: change them, then ``write()``.
    """

    def __init__(
        self, root: Path, prefix: str, redis_url: str, *, name: str = "", watch: bool = False
    ) -> None:
        self.root = root
        self.prefix = prefix
        self.flows = root / "flows"
        self.flows.mkdir(parents=True, exist_ok=True)
        self.config: dict[str, Any] = {
            "redis": {"url": redis_url},
            "flows": "flows/",
            "runner": {"name": name or f"r-{prefix.split(':')[1]}", "shutdown_grace": "10s"},
            "reload": {"watch": watch, "debounce": "100ms"},
            "admin": {"listen": "off"},
            "log": {"level": "info"},
        }
        self.streams: dict[str, Any] = {
            "tasks": {
                "key": prefix + "tasks:{{ priority }}",
                "priorities": ["critical", "high", "normal", "low"],
            },
            "inbox": {"key": prefix + "messages:{{ agent }}"},
            "dlq": {"key": prefix + "dlq"},
        }
        self.agents: dict[str, Any] = {"harold": None, "worker": None}
        self.groups: dict[str, Any] = {
            "agents": {
                "stream": "tasks",
                "dead_letter": "dlq",
                "routes": [
                    {"when": "msg.to in agents", "to": "inbox", "vars": {"agent": "{{ msg.to }}"}},
                    {"call": "reload_helpers:handle"},
                ],
            },
            "inboxes": {
                "stream": "inbox",  # no vars: reads every agent's inbox
                "dead_letter": "dlq",
                "routes": [{"call": "reload_helpers:inbox"}],
            },
        }

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def write(self) -> None:
        """Write config.yaml and the three flow files."""
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        files = {
            "streams.yaml": {"version": 1, "streams": self.streams},
            "agents.yaml": {"version": 1, "agents": self.agents},
            "groups.yaml": {"version": 1, "groups": self.groups},
        }
        for name, data in files.items():
            (self.flows / name).write_text(yaml.safe_dump(data, sort_keys=False))

    def load(self) -> Project:
        self.write()
        return load_project(self.config_path)


# --- a producer and the final accounting -------------------------------------------------


class Producer:
    """Publishes to the priority streams at a steady rate, a unique ``id`` in each message.

    Every ``inbox_every``-th message is addressed to an agent (``to``), so it travels
    through the ``agents`` group into an inbox group.
    """

    PRIORITIES = ("critical", "high", "normal", "low")

    def __init__(
        self,
        client: Any,
        prefix: str,
        *,
        rate: float = 300.0,
        agents: tuple[str, ...] = ("harold", "worker"),
        inbox_every: int = 3,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.rate = rate
        self.agents = agents
        self.inbox_every = inbox_every
        self.published: list[str] = []
        self._paused = False
        self._idle = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Producer:
        self._task = asyncio.create_task(self._run())
        return self

    async def wait_published(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` more messages went out."""
        target = len(self.published) + count
        await wait_for(lambda: len(self.published) >= target, timeout, f"{count} publishes")

    async def pause(self) -> None:
        """Stop publishing; returns once no publish is in progress."""
        self._idle.clear()
        self._paused = True
        await self._idle.wait()

    def resume(self) -> None:
        self._paused = False

    async def stop(self) -> list[str]:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.published

    async def _run(self) -> None:
        counter = itertools.count()
        tick = 0.02
        per_tick = max(1, round(self.rate * tick))
        while not self._stop.is_set():
            if self._paused:
                self._idle.set()
                await asyncio.sleep(tick)
                continue
            batch = []
            for _ in range(per_tick):
                n = next(counter)
                fields = {"id": f"m{n}", "n": str(n)}
                if n % self.inbox_every == 0:
                    fields["to"] = self.agents[n // self.inbox_every % len(self.agents)]
                batch.append((f"{self.prefix}tasks:{self.PRIORITIES[n % 4]}", fields))
            await self._publish(batch)
            self.published.extend(fields["id"] for _, fields in batch)
            await asyncio.sleep(tick)

    async def _publish(self, batch: list[tuple[str, dict[str, str]]]) -> None:
        # a connection the server closed fails once before the client reconnects
        for attempt in range(50):
            pipe = self.client.pipeline(transaction=False)
            for key, fields in batch:
                pipe.xadd(key, fields)
            try:
                await pipe.execute()
                return
            except RedisConnectionError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)


def group_keys(runner: Any) -> dict[str, list[str]]:
    """Every group the runner runs now, with the keys it reads."""
    assert runner.resolved is not None
    return {n: [k.key for k in g.keys] for n, g in runner.resolved.groups.items()}


async def pending_total(client: Any, groups: Mapping[str, list[str]]) -> dict[str, int]:
    """XPENDING count of every group on every key it reads, non-zero ones only."""
    out: dict[str, int] = {}
    for group, keys in groups.items():
        for key in keys:
            if not await client.exists(key):
                continue
            count = int((await client.xpending(key, group))["pending"])
            if count:
                out[f"{group}@{key}"] = count
    return out


async def caught_up(client: Any, runner: Any) -> bool:
    """Whether every running group was delivered every entry of the keys it reads."""
    for group, keys in group_keys(runner).items():
        for key in keys:
            if not await client.exists(key):
                continue
            last = (await client.xinfo_stream(key))["last-generated-id"]
            info = [g for g in await client.xinfo_groups(key) if g["name"] == group]
            if not info or info[0]["last-delivered-id"] != last:
                return False
    return True


async def assert_exact(
    client: Any,
    runner: Any,
    published: list[str],
    *,
    once: bool = True,
    also: Mapping[str, list[str]] | None = None,
    timeout: float = 20.0,
) -> None:
    """Every published id handled (exactly once when ``once``) and nothing left pending.

    Pending is checked for every group the runner runs now, plus ``also`` (groups a
    reload removed).
    """
    assert published, "the producer published nothing"
    assert len(set(published)) == len(published)
    groups = {**(also or {}), **group_keys(runner)}
    try:
        await wait_for(lambda: all(HANDLED.counts[i] for i in published), timeout, "handling")
    except AssertionError as exc:
        missing = [i for i in published if not HANDLED.counts[i]]
        raise AssertionError(f"{exc}: {len(missing)} of {len(published)} never handled") from None

    async def drained() -> bool:
        return not await pending_total(client, groups) and await caught_up(client, runner)

    try:
        await wait_for(drained, timeout, "every group to catch up with nothing pending")
    except AssertionError as exc:
        pending = await pending_total(client, groups)
        behind = await caught_up(client, runner)
        raise AssertionError(f"{exc}: pending {pending}, all caught up: {behind}") from None
    assert await pending_total(client, groups) == {}
    if once:
        dupes = {i: n for i, n in HANDLED.counts.items() if n > 1}
        assert dupes == {}, f"{len(dupes)} message(s) handled more than once"
    unknown = set(HANDLED.counts) - set(published)
    assert unknown == set()
