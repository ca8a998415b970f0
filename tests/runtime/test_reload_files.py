"""Reload triggers end to end: real files with the real watcher, SIGHUP, ``POST /reload``."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis_servers import free_port
from reload_helpers import (
    HANDLED,
    FlowProject,
    Producer,
    assert_exact,
    pending_total,
    reloads,
    running,
    wait_for,
)

from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import resolve
from cortex_flow.runtime.runner import Runner, serve


@pytest.fixture
def project(tmp_path: Path, key_prefix: str, redis_url: str) -> FlowProject:
    return FlowProject(tmp_path, key_prefix, redis_url, watch=True)


async def test_real_watcher_applies_file_edits(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Edits to a flow file and to config.yaml (grace, debounce), seen by the real watcher,
    are applied while messages flow, with nothing lost or doubled."""
    async with running(project, watcher=None) as (runner, _):
        # the OS watcher starts in the background: touch a file until it reports
        async def watching(since: int = 0) -> bool:
            (project.flows / "agents.yaml").touch()
            await asyncio.sleep(0.05)
            return reloads(runner) > since

        await wait_for(watching, what="the file watcher to start")
        producer = Producer(redis_client, key_prefix).start()
        await wait_for(lambda: HANDLED.tagged("a") >= 20, what="the first route to serve")
        project.groups["agents"]["routes"][1]["call"] = "reload_helpers:handle_b"
        project.write()
        await wait_for(lambda: HANDLED.tagged("b") >= 20, what="the edited route to serve")
        assert runner.stats.reload.last_outcome == "applied"
        assert "changed routes[1]" in " ".join(runner.stats.reload.last_changes)

        project.config["runner"]["shutdown_grace"] = "7s"
        project.write()
        await wait_for(lambda: runner.config.runner.shutdown_grace == 7.0, what="the new grace")
        assert runner.stats.reload.last_changes == ["setting runner.shutdown_grace: 10s -> 7s"]

        project.config["reload"]["debounce"] = "50ms"
        project.write()
        await wait_for(lambda: runner.config.reload.debounce == 0.05, what="the new debounce")
        since = reloads(runner)  # the watcher restarts with it and still sees edits
        await wait_for(lambda: watching(since), what="the restarted watcher to report")
        published = await producer.stop()
        await assert_exact(redis_client, runner, published)


async def test_sighup_reloads_a_running_runner(
    project: FlowProject, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """`run` reloads on SIGHUP (an added group starts) and drains on SIGTERM."""
    project.config["reload"]["watch"] = False
    HANDLED.reset()
    running_task = asyncio.create_task(serve(Runner(project.load())))
    producer = Producer(redis_client, key_prefix).start()
    try:
        await wait_for(lambda: HANDLED.tagged("a") >= 20, what="the runner to serve")
        project.groups["audit"] = {"stream": "tasks", "routes": [{"call": "reload_helpers:audit"}]}
        project.write()
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: HANDLED.tagged("audit") >= 20, what="the added group to serve")
        published = await producer.stop()
        await wait_for(lambda: all(HANDLED.counts[i] for i in published), what="all handled")
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(running_task, 15)  # returns once drained (raises on failure)
    assert all(HANDLED.counts[i] == 1 for i in published)
    resolved = resolve(load_project(project.config_path).topology, "x")
    groups = {n: [k.key for k in g.keys] for n, g in resolved.groups.items()}
    assert await pending_total(redis_client, groups) == {}


async def test_admin_post_reload_reports_outcome_and_errors(project: FlowProject) -> None:
    """POST /reload applies (200) or rejects (409 with file:line errors); /readyz and
    /metrics show the rejection until a valid edit applies."""
    port = free_port()
    project.config["admin"]["listen"] = f"127.0.0.1:{port}"
    base = f"http://127.0.0.1:{port}"
    async with running(project, admin=True) as (runner, _), aiohttp.ClientSession() as http:
        project.groups["agents"]["batch"] = 10
        project.write()
        async with http.post(f"{base}/reload") as resp:
            assert resp.status == 200
            assert (await resp.json())["outcome"] == "applied"
        assert runner.consumers["agents"].spec.batch == 10

        project.groups["agents"]["routes"][1]["when"] = "msg.type =="
        project.write()
        async with http.post(f"{base}/reload") as resp:
            assert resp.status == 409
            report = await resp.json()
        assert report["outcome"] == "rejected"
        assert "groups.yaml:" in report["errors"][0], report
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200  # still serving the previous topology
            detail = (await resp.json())["detail"]
        assert detail["reload"]["errors"] == report["errors"]
        async with http.get(f"{base}/metrics") as resp:
            metrics = await resp.text()
        assert 'cortex_flow_reloads_total{outcome="rejected"} 1.0' in metrics
        assert "cortex_flow_last_reload_success 0.0" in metrics

        del project.groups["agents"]["routes"][1]["when"]
        project.write()
        async with http.post(f"{base}/reload") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/readyz") as resp:
            assert (await resp.json())["detail"]["reload"]["errors"] == []
