"""Hot reload against a real Redis, with messages flowing and exact accounting by id.

The file watcher is scripted (:class:`reload_helpers.ScriptedWatcher`): a test writes the
files, pushes one change, and waits for the reload's outcome, so nothing here sleeps on
the OS watcher. Real files with the real watcher, SIGHUP and ``POST /reload`` are in
``test_reload_files.py``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from redis_servers import PrivateRedis, free_port
from reload_helpers import (
    HANDLED,
    STALLED,
    FlowProject,
    Producer,
    assert_exact,
    edit,
    group_keys,
    running,
    wait_for,
)

import cortex_flow.runtime.reload as reload_module
import cortex_flow.runtime.running as running_module
from cortex_flow.runtime.metrics import build_registry, render


@pytest.fixture
def project(tmp_path: Path, key_prefix: str, redis_url: str) -> FlowProject:
    return FlowProject(tmp_path, key_prefix, redis_url)


def processed(runner: Any, group: str) -> int:
    stats = runner.stats.groups[group]
    return sum(k.processed for k in stats.keys.values())


async def test_added_group_starts_while_messages_flow(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A group added by a reload is created in Redis and starts consuming at once."""
    async with running(project) as (runner, watcher):
        producer = Producer(redis_client, key_prefix).start()
        await producer.wait_published(60)
        before = dict(runner.consumers)
        project.groups["audit"] = {
            "stream": "tasks",
            "start": "latest",
            "routes": [{"call": "reload_helpers:audit"}],
        }
        assert await edit(project, runner, watcher) == "applied"
        assert "group audit: added" in runner.stats.reload.last_changes[0]
        assert all(runner.consumers[n] is c for n, c in before.items())
        await wait_for(lambda: HANDLED.tagged("audit") >= 30, what="the new group to consume")
        published = await producer.stop()
        await assert_exact(redis_client, runner, published)


async def test_removed_group_drains_and_stops(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A removed group finishes what it holds, acknowledges it and exits; others go on."""
    project.groups["audit"] = {"stream": "tasks", "routes": [{"call": "reload_helpers:audit"}]}
    async with running(project) as (runner, watcher):
        producer = Producer(redis_client, key_prefix).start()
        await wait_for(lambda: HANDLED.tagged("audit") >= 20, what="the audit group to consume")
        removed = group_keys(runner)["audit"]
        audit, agents = runner.consumers["audit"], runner.consumers["agents"]
        del project.groups["audit"]
        assert await edit(project, runner, watcher) == "applied"
        assert "audit" not in runner.consumers
        assert runner.consumers["agents"] is agents
        await asyncio.wait_for(audit.done.wait(), 10)
        assert audit._task is not None and audit._task.done()
        handled_by_audit = HANDLED.tagged("audit")
        await producer.wait_published(150)
        assert HANDLED.tagged("audit") == handled_by_audit  # stopped taking messages
        published = await producer.stop()
        await assert_exact(redis_client, runner, published, also={"audit": removed})


async def test_changed_group_is_replaced_make_before_break(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A batch/concurrency change starts the successor (same consumer name) before the
    old consumer stops; it waits for the old one, and nothing is lost or doubled."""
    async with running(project) as (runner, watcher):
        producer = Producer(redis_client, key_prefix).start()
        await producer.wait_published(100)
        old, inboxes = runner.consumers["agents"], runner.consumers["inboxes"]
        inbox_count = processed(runner, "inboxes")
        project.groups["agents"].update(batch=7, concurrency=2)
        assert await edit(project, runner, watcher) == "applied"
        new = runner.consumers["agents"]
        assert new is not old
        assert new.me == old.me
        assert new.predecessor is old.done
        assert (new.spec.batch, new.spec.concurrency) == (7, 2)
        assert runner.consumers["inboxes"] is inboxes  # untouched: same consumer, no pause
        await asyncio.wait_for(old.done.wait(), 10)
        await producer.wait_published(150)
        assert inboxes._task is not None and not inboxes._task.done()
        assert processed(runner, "inboxes") > inbox_count
        published = await producer.stop()
        await assert_exact(redis_client, runner, published)
        assert new.spec.batch == 7 and processed(runner, "agents") > 0


async def test_route_change_swaps_the_table_in_place(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A route-only change keeps the same consumer and applies from the next message on."""
    async with running(project) as (runner, watcher):
        producer = Producer(redis_client, key_prefix).start()
        await wait_for(lambda: HANDLED.tagged("a") >= 30, what="the first route to serve")
        consumers = dict(runner.consumers)
        project.groups["agents"]["routes"][1]["call"] = "reload_helpers:handle_b"
        assert await edit(project, runner, watcher) == "applied"
        assert runner.consumers == consumers
        assert all(runner.consumers[n] is c for n, c in consumers.items())
        assert not any(c._task is None or c._task.done() for c in consumers.values())
        served_by_a = HANDLED.tagged("a")
        await wait_for(lambda: HANDLED.tagged("b") >= 30, what="the new route to serve")
        assert HANDLED.tagged("a") == served_by_a
        published = await producer.stop()
        await assert_exact(redis_client, runner, published)


async def test_added_agent_gets_its_inbox_read_and_routed(
    project: FlowProject,
    redis_client: aioredis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Adding an agent provisions its inbox, restarts the group that expands over agents
    (a change of its keys), lets `msg.to in agents` route to it, and logs each change."""
    caplog.set_level(logging.INFO, logger="cortex_flow.reload")
    async with running(project) as (runner, watcher):
        producer = Producer(redis_client, key_prefix, agents=("harold", "planner")).start()
        await producer.wait_published(60)
        inboxes, agents = runner.consumers["inboxes"], runner.consumers["agents"]
        project.agents["planner"] = None
        assert await edit(project, runner, watcher) == "applied"
        planner_key = f"{key_prefix}messages:planner"
        assert runner.consumers["inboxes"] is not inboxes  # its keys changed: restarted
        assert planner_key in [k.key for k in runner.consumers["inboxes"].keys]
        assert runner.consumers["agents"] is agents  # `agents` in its routes: swapped only
        assert "planner" in runner.consumers["agents"].table.agents
        groups = await redis_client.xinfo_groups(planner_key)
        assert [g["name"] for g in groups] == ["inboxes"]
        logged = [r.getMessage() for r in caplog.records if r.name == "cortex_flow.reload"]
        assert (
            logged[-4:-1]
            == runner.stats.reload.last_changes
            == [
                "agent planner: declared (no heartbeat)",
                f"agent planner: inbox {planner_key} added",
                f"group inboxes: now also reads {planner_key}",
            ]
        )
        assert re.fullmatch(
            r"reload \(file change\) applied in \d+ms: 3 change\(s\); "
            r"groups restarted inboxes; routes swapped agents",
            logged[-1],
        ), logged[-1]
        await wait_for(
            lambda: (
                (len(HANDLED.by.get("inbox", {})) > 0)
                and any(int(i[1:]) % 6 == 3 for i in HANDLED.by["inbox"])
            ),
            what="a message to planner to arrive through its inbox",
        )
        published = await producer.stop()
        await assert_exact(redis_client, runner, published)


async def test_invalid_edit_keeps_the_running_topology(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """An invalid edit is rejected with file:line errors (log, stats, readiness, metrics),
    changes nothing, and the next valid edit applies."""
    async with running(project) as (runner, watcher):
        registry, _ = build_registry(runner.stats)
        producer = Producer(redis_client, key_prefix).start()
        await producer.wait_published(60)
        consumers, resolved = dict(runner.consumers), runner.resolved
        project.groups["agents"]["batch"] = 0
        assert await edit(project, runner, watcher) == "rejected"
        errors = runner.stats.reload.last_errors
        assert len(errors) == 1
        line = (project.flows / "groups.yaml").read_text().splitlines().index("    batch: 0") + 1
        assert f"groups.yaml:{line}:" in errors[0], errors
        assert "groups.agents.batch" in errors[0], errors
        assert runner.resolved is resolved
        assert all(runner.consumers[n] is c for n, c in consumers.items())
        ok, detail = runner.ready()
        assert ok  # still serving the previous topology
        assert detail["reload"]["last_outcome"] == "rejected"
        assert detail["reload"]["errors"] == errors
        assert 'cortex_flow_reloads_total{outcome="rejected"} 1.0' in render(registry).decode()
        await producer.wait_published(60)  # still flowing through the old topology
        project.groups["agents"]["batch"] = 50
        assert await edit(project, runner, watcher) == "applied"
        assert runner.stats.reload.last_errors == []
        assert runner.consumers["agents"].spec.batch == 50
        published = await producer.stop()
        await assert_exact(redis_client, runner, published)


@pytest.mark.parametrize(
    ("section", "setting", "value"),
    [
        ("redis", "url", "redis://127.0.0.1:1/0"),
        ("runner", "name", "someone-else"),
        ("admin", "listen", "127.0.0.1:9"),
    ],
)
async def test_restart_only_setting_rejects_the_whole_reload(
    project: FlowProject, section: str, setting: str, value: str
) -> None:
    """A change to a setting read only at start rejects the reload whole, saying restart."""
    async with running(project) as (runner, watcher):
        consumers = dict(runner.consumers)
        project.config[section][setting] = value
        project.groups["agents"]["batch"] = 5  # valid on its own: must not be applied
        assert await edit(project, runner, watcher) == "rejected"
        (error,) = runner.stats.reload.last_errors
        assert error.startswith(f"{section}.{setting} changed") and "restart" in error
        assert runner.consumers == consumers
        assert runner.consumers["agents"].spec.batch == 100


async def test_ten_reloads_back_to_back(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Ten successive reloads (restarts, route swaps, add/remove) lose and double nothing,
    and leave no consumer or task behind."""
    async with running(project) as (runner, watcher):
        producer = Producer(redis_client, key_prefix).start()
        await producer.wait_published(30)
        removed: dict[str, list[str]] = {}
        for i in range(10):
            step = i % 4
            if step == 0:
                project.groups["agents"]["batch"] = 10 + i
            elif step == 1:
                route = project.groups["agents"]["routes"][1]
                route["call"] = f"reload_helpers:handle{'_b' if i % 8 == 1 else ''}"
            elif step == 2:
                project.groups["audit"] = {
                    "stream": "tasks",
                    "start": "latest",
                    "routes": [{"call": "reload_helpers:audit"}],
                }
            else:
                removed.update(group_keys(runner))
                project.groups.pop("audit", None)
                project.groups["inboxes"]["concurrency"] = 1 + i
            assert await edit(project, runner, watcher) == "applied", runner.stats.reload
        published = await producer.stop()
        await assert_exact(redis_client, runner, published, also=removed)
        await wait_for(lambda: not runner.running.retiring, what="retired consumers to exit")
        assert len(runner.consumers) == 2

        def consumer_tasks() -> list[str]:
            return sorted(t.get_name() for t in asyncio.all_tasks() if "consumer:" in t.get_name())

        await wait_for(lambda: len(consumer_tasks()) == 2, what="retired consumers' tasks to end")
        assert consumer_tasks() == ["consumer:agents", "consumer:inboxes"]


async def test_consumer_past_its_grace_still_hands_over(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A replaced consumer whose handler outlives shutdown_grace is cut off, and its
    successor takes back what it held (nothing left pending, nothing stuck)."""
    project.config["runner"]["shutdown_grace"] = "200ms"
    project.groups["agents"]["routes"][1]["call"] = "reload_helpers:stall_once"
    project.groups["agents"]["routes"] = project.groups["agents"]["routes"][1:]
    async with running(project) as (runner, watcher):
        ids = [f"s{i}" for i in range(3)]
        for msg_id in ids:
            await redis_client.xadd(f"{key_prefix}tasks:high", {"id": msg_id})
        await wait_for(lambda: len(STALLED) == 3, what="handlers to hang")
        old = runner.consumers["agents"]
        project.groups["agents"]["concurrency"] = 8
        assert await edit(project, runner, watcher) == "applied"
        await asyncio.wait_for(old.done.wait(), 10)
        await assert_exact(redis_client, runner, ids)


async def test_reload_during_stop_is_rejected(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A reload that arrives while the runner drains is rejected and starts nothing."""
    project.groups["agents"]["routes"][1]["call"] = "reload_helpers:slow"
    project.groups["agents"]["concurrency"] = 2
    async with running(project) as (runner, _):
        for n in range(100):
            await redis_client.xadd(f"{key_prefix}tasks:normal", {"id": f"m{n}"})
        await wait_for(lambda: HANDLED.tagged("slow") >= 5, what="slow handling to begin")
        consumers = dict(runner.consumers)
        project.groups["extra"] = {"stream": "tasks", "routes": [{"drop": True}]}
        project.write()
        stopping = asyncio.create_task(runner.stop())
        await wait_for(lambda: runner.stopping)
        report = await runner.reload("test")
        assert report["outcome"] == "rejected"
        assert report["errors"] == ["runner is stopping: reload not applied"]
        assert runner.consumers == consumers
        assert await stopping  # drained clean
        for key in group_keys(runner)["agents"]:
            assert (await redis_client.xpending(key, "agents"))["pending"] == 0
        assert all(n == 1 for n in HANDLED.counts.values())
        names = [g["name"] for g in await redis_client.xinfo_groups(f"{key_prefix}tasks:normal")]
        assert "extra" not in names


async def test_stop_during_provisioning_starts_nothing(
    project: FlowProject, monkeypatch: pytest.MonkeyPatch, redis_client: aioredis.Redis
) -> None:
    """A stop that begins while a reload provisions makes that reload start nothing."""
    entered, release = asyncio.Event(), asyncio.Event()
    real = running_module.ensure_group

    async def blocked(*args: Any) -> bool:
        entered.set()
        await release.wait()
        return await real(*args)

    async with running(project) as (runner, _):
        monkeypatch.setattr(running_module, "ensure_group", blocked)  # reload's group creation
        consumers = dict(runner.consumers)
        project.groups["extra"] = {"stream": "tasks", "routes": [{"drop": True}]}
        project.write()
        reloading = asyncio.create_task(runner.reload("test"))
        await asyncio.wait_for(entered.wait(), 5)
        runner.request_stop()
        release.set()
        report = await reloading
        assert report["outcome"] == "rejected"
        assert "runner is stopping" in report["errors"][0]
        assert runner.consumers == consumers
        assert await runner.stop()


async def test_reload_while_redis_is_unreachable(
    tmp_path: Path,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With Redis down a reload rolls back (old topology keeps running) or, if Redis
    returns in time, applies; afterwards every message is handled and none pending."""
    with PrivateRedis(tmp_path / "redis", appendonly=True) as server:
        project = FlowProject(tmp_path / "p", key_prefix, server.url)
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            async with running(project) as (runner, watcher):
                producer = Producer(client, key_prefix).start()
                await producer.wait_published(100)
                consumers = dict(runner.consumers)
                await producer.pause()
                await asyncio.to_thread(server.stop)

                # 1. Redis stays down past the provisioning deadline: rolled back
                monkeypatch.setattr(reload_module, "PROVISION_TIMEOUT", 0.3)
                project.groups["agents"]["batch"] = 20
                project.groups["audit"] = {
                    "stream": "tasks",
                    "routes": [{"call": "reload_helpers:audit"}],
                }
                assert await edit(project, runner, watcher) == "rolled_back"
                assert "provisioning failed" in runner.stats.reload.last_errors[0]
                assert runner.consumers == consumers
                assert runner.consumers["agents"].spec.batch == 100

                # 2. Redis comes back while the reload retries: applied
                monkeypatch.setattr(reload_module, "PROVISION_TIMEOUT", 30.0)
                caplog.clear()
                reloading = asyncio.create_task(runner.reload("test"))
                await wait_for(
                    lambda: "cannot reach Redis" in caplog.text, what="the reload to retry"
                )
                await asyncio.to_thread(server.start)
                assert (await reloading)["outcome"] == "applied"
                assert runner.consumers["agents"].spec.batch == 20
                assert "audit" in runner.consumers

                producer.resume()
                await producer.wait_published(100)
                published = await producer.stop()
                # acks lost with the connection are redelivered: at least once here
                await assert_exact(client, runner, published, once=False, timeout=30)
        finally:
            await client.aclose()


async def test_failed_provisioning_rolls_back_and_keeps_watching(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A group Redis refuses to create (the key is not a stream) rolls the reload back,
    names the key, and the watcher goes on to apply the next edit."""
    async with running(project) as (runner, watcher):
        consumers = dict(runner.consumers)
        await redis_client.set(f"{key_prefix}notastream", "x")
        project.streams["odd"] = {"key": f"{key_prefix}notastream"}
        project.groups["odd"] = {"stream": "odd", "routes": [{"drop": True}]}
        assert await edit(project, runner, watcher) == "rolled_back"
        (error,) = runner.stats.reload.last_errors
        assert f"group odd on {key_prefix}notastream" in error and "WRONGTYPE" in error
        assert runner.consumers == consumers
        del project.groups["odd"], project.streams["odd"]
        project.groups["agents"]["batch"] = 9
        assert await edit(project, runner, watcher) == "applied"
        assert runner.consumers["agents"].spec.batch == 9


async def test_call_target_that_fails_on_import_is_rejected(project: FlowProject) -> None:
    """A call target whose module raises on import rejects the reload with the route's
    place, instead of ending the watcher."""
    (project.root / "broken_handlers.py").write_text('raise RuntimeError("boom")\n')
    async with running(project) as (runner, watcher):
        project.groups["agents"]["routes"][1]["call"] = "broken_handlers:handle"
        assert await edit(project, runner, watcher) == "rejected"
        (error,) = runner.stats.reload.last_errors
        assert "groups.yaml:" in error and "RuntimeError: boom" in error, error
        project.groups["agents"]["routes"][1]["call"] = "reload_helpers:handle_b"
        assert await edit(project, runner, watcher) == "applied"


async def test_first_http_route_brought_by_a_route_swap_works(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A runner started without http routes gets an HTTP client when a reload adds one."""

    async def hook(request: web.Request) -> web.Response:
        HANDLED.add("http", await request.json())
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = web.AppRunner(app)
    await server.setup()
    port = free_port()
    await web.TCPSite(server, "127.0.0.1", port).start()
    try:
        async with running(project) as (runner, watcher):
            producer = Producer(redis_client, key_prefix).start()
            await wait_for(lambda: HANDLED.tagged("a") >= 20, what="the first route to serve")
            agents = runner.consumers["agents"]
            project.groups["agents"]["routes"][1] = {
                "http": {"url": f"http://127.0.0.1:{port}/hook"}
            }
            assert await edit(project, runner, watcher) == "applied"
            assert runner.consumers["agents"] is agents
            await wait_for(lambda: HANDLED.tagged("http") >= 20, what="the http route to serve")
            published = await producer.stop()
            await assert_exact(redis_client, runner, published)
    finally:
        await server.cleanup()
