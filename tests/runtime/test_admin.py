"""The admin endpoint and the Prometheus exposition, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from cortex_flow.errors import CortexFlowError
from cortex_flow.runtime.admin import AdminServer, is_loopback
from cortex_flow.runtime.metrics import CONTENT_TYPE, RunnerCollector, build_registry, render
from cortex_flow.runtime.stats import BUCKETS, AgentState, GroupStats, RunnerStats

LOG = logging.getLogger("cortex_flow.test_admin")
HIGH = "cortex:tasks:high"


def filled_stats() -> RunnerStats:
    """A runner with counters on one group and key, two agents and one reload."""
    stats = RunnerStats(runner="r1", started_at=1700000000.0, connected=True, provisioned=True)
    group = stats.groups["agents"] = GroupStats(group="agents", consumer="r1")
    key = group.key(HIGH)
    key.processed, key.failed, key.retried = 3, 1, 2
    key.dead_lettered, key.unmatched, key.claimed = 1, 4, 5
    key.expired, key.canceled = 6, 8
    for seconds in (0.0002, 0.003, 0.003, 0.7, 45.0):
        key.latency.observe(seconds)
    stats.pending[("agents", HIGH)] = 7
    stats.oldest_pending_age[("agents", HIGH)] = 12.5
    stats.lag[("agents", HIGH)] = 42
    stats.consumers[("agents", HIGH, "r1")] = 7
    stats.agents["harold"] = AgentState("harold", up=True, last_beat=time.time() - 5, timeout=90)
    stats.agents["planner"] = AgentState("planner", up=None, timeout=30)
    stats.reload.totals = {"applied": 2, "rejected": 1}
    return stats


def ready_ok() -> tuple[bool, dict[str, Any]]:
    return True, {"connected": True, "provisioned": True, "draining": False, "errors": []}


class Admin:
    """A started AdminServer plus a client session pointed at it."""

    def __init__(self, server: AdminServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.base = f"http://127.0.0.1:{server.bound_port}"

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.base + path) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def post(self, path: str) -> tuple[int, Any]:
        async with self.session.post(self.base + path) as response:
            return response.status, await response.json()


StartAdmin = Callable[..., Awaitable[Admin]]


def server_on(host: str, port: int, **overrides: Any) -> AdminServer:
    """An AdminServer over filled stats with no reload or refresh, unless overridden."""
    options: dict[str, Any] = {
        "stats": filled_stats(),
        "ready": ready_ok,
        "reload": None,
        "refresh": None,
        "log": LOG,
    }
    options.update(overrides)
    return AdminServer(host, port, **options)


@pytest.fixture
async def start_admin() -> AsyncIterator[StartAdmin]:
    """Starts AdminServers on 127.0.0.1:0 with overridable callbacks; stops them at teardown."""
    servers: list[AdminServer] = []
    session = aiohttp.ClientSession()

    async def start(**overrides: Any) -> Admin:
        server = server_on("127.0.0.1", 0, **overrides)
        await server.start()
        servers.append(server)
        return Admin(server, session)

    try:
        yield start
    finally:
        await session.close()
        for server in servers:
            await server.stop()


def reload_returning(report: dict[str, Any]) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def reload() -> dict[str, Any]:
        return report

    return reload


# --- endpoints ---------------------------------------------------------------------------


async def test_healthz_answers_ok(start_admin: StartAdmin) -> None:
    """GET /healthz answers 200 {"status": "ok"} while the process runs."""
    admin = await start_admin()
    assert await admin.get("/healthz") == (200, {"status": "ok"})


async def test_readyz_200_with_detail_when_ready(start_admin: StartAdmin) -> None:
    """GET /readyz answers 200 with the runner's detail when ready() says ready."""
    admin = await start_admin()
    status, body = await admin.get("/readyz")
    assert status == 200
    assert body == {"status": "ready", "detail": ready_ok()[1]}


async def test_readyz_503_with_reasons_when_not_ready(start_admin: StartAdmin) -> None:
    """GET /readyz answers 503 with the runner's reasons, reload errors included."""
    detail = {"connected": True, "draining": True, "errors": ["flows/a.yaml:3:5: bad"]}
    admin = await start_admin(ready=lambda: (False, detail))
    assert await admin.get("/readyz") == (503, {"status": "not ready", "detail": detail})


async def test_readyz_503_when_ready_check_raises(start_admin: StartAdmin) -> None:
    """A readiness check that raises makes /readyz answer 503, never 200."""

    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("boom")

    admin = await start_admin(ready=broken)
    status, body = await admin.get("/readyz")
    assert status == 503
    assert body == {"status": "not ready", "detail": {"error": "readiness check failed: boom"}}


async def test_index_lists_endpoints(start_admin: StartAdmin) -> None:
    """GET / names the runner and lists the endpoints, POST /reload only when available."""
    admin = await start_admin()
    status, body = await admin.get("/")
    assert status == 200
    assert body["runner"] == "r1"
    assert set(body["endpoints"]) == {"GET /healthz", "GET /readyz", "GET /metrics"}
    admin = await start_admin(reload=reload_returning({"outcome": "unchanged"}))
    assert "POST /reload" in (await admin.get("/"))[1]["endpoints"]


async def test_unknown_path_and_wrong_method_answer_json(start_admin: StartAdmin) -> None:
    """Unknown paths answer 404 and wrong methods 405, both as JSON."""
    admin = await start_admin()
    assert await admin.get("/nope") == (404, {"error": "Not Found", "path": "/nope"})
    assert await admin.post("/healthz") == (
        405,
        {"error": "Method Not Allowed", "path": "/healthz"},
    )


# --- /metrics ----------------------------------------------------------------------------


async def test_metrics_exposes_counters_gauges_and_agents(start_admin: StartAdmin) -> None:
    """GET /metrics serves the counters, gauges and agent states as exact Prometheus lines."""
    admin = await start_admin()
    async with admin.session.get(admin.base + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        lines = set((await response.text()).splitlines())
    labels = f'consumer="r1",group="agents",stream="{HIGH}"'
    pair = f'group="agents",stream="{HIGH}"'
    expected = {
        f"cortex_flow_processed_total{{{labels}}} 3.0",
        f"cortex_flow_failed_total{{{labels}}} 1.0",
        f"cortex_flow_retried_total{{{labels}}} 2.0",
        f"cortex_flow_dead_lettered_total{{{labels}}} 1.0",
        f"cortex_flow_unmatched_total{{{labels}}} 4.0",
        f"cortex_flow_claimed_total{{{labels}}} 5.0",
        f"cortex_flow_expired_total{{{labels}}} 6.0",
        f"cortex_flow_canceled_total{{{labels}}} 8.0",
        f"cortex_flow_pending{{{pair}}} 7.0",
        f"cortex_flow_oldest_pending_age_seconds{{{pair}}} 12.5",
        f"cortex_flow_lag{{{pair}}} 42.0",
        f"cortex_flow_consumer_pending{{{labels}}} 7.0",
        'cortex_flow_agent_up{agent="harold"} 1.0',
        'cortex_flow_agent_heartbeat_timeout_seconds{agent="planner"} 30.0',
        'cortex_flow_runner_info{runner="r1",version="0.1.0"} 1.0',
        "cortex_flow_up 1.0",
        "cortex_flow_connected 1.0",
        "cortex_flow_provisioned 1.0",
        "cortex_flow_draining 0.0",
        "cortex_flow_start_time_seconds 1.7e+09",
        'cortex_flow_reloads_total{outcome="applied"} 2.0',
        'cortex_flow_reloads_total{outcome="rejected"} 1.0',
        "cortex_flow_last_reload_success 1.0",
        "cortex_flow_last_reload_errors 0.0",
    }
    assert expected <= lines
    # a declared agent never seen is not up: 0, so the documented `== 0` alert fires
    assert 'cortex_flow_agent_up{agent="planner"} 0.0' in lines
    assert not any(line.startswith("cortex_flow_refresh_success") for line in lines)


async def test_metrics_histogram_buckets_are_cumulative(start_admin: StartAdmin) -> None:
    """The handler histogram turns per-bucket counts into cumulative le buckets ending at +Inf."""
    admin = await start_admin()
    status, text = await admin.get("/metrics")
    assert status == 200
    pattern = re.compile(r'^cortex_flow_handler_seconds_bucket\{.*le="([^"]+)".*\} (\S+)$')
    buckets = [(m[1], m[2]) for m in map(pattern.match, text.splitlines()) if m]
    assert [le for le, _ in buckets] == [repr(b) for b in BUCKETS] + ["+Inf"]
    values = dict(buckets)
    # observed: 0.0002, 0.003, 0.003, 0.7, 45.0
    assert values["0.0005"] == "1.0"
    assert values["0.0025"] == "1.0"
    assert values["0.005"] == "3.0"
    assert values["0.5"] == "3.0"
    assert values["1.0"] == "4.0"
    assert values["30.0"] == "4.0"
    assert values["+Inf"] == "5.0"
    counts = [float(v) for _, v in buckets]
    assert counts == sorted(counts)
    labels = f'consumer="r1",group="agents",stream="{HIGH}"'
    assert f"cortex_flow_handler_seconds_count{{{labels}}} 5.0" in text.splitlines()
    assert f"cortex_flow_handler_seconds_sum{{{labels}}} 45.7062" in text.splitlines()


async def test_metrics_awaits_refresh_before_rendering(start_admin: StartAdmin) -> None:
    """GET /metrics awaits refresh() first, so the gauges it updates are the ones served."""
    stats = filled_stats()

    async def refresh() -> None:
        stats.lag[("agents", HIGH)] = 99

    admin = await start_admin(stats=stats, refresh=refresh)
    status, text = await admin.get("/metrics")
    assert status == 200
    lines = text.splitlines()
    assert f'cortex_flow_lag{{group="agents",stream="{HIGH}"}} 99.0' in lines
    assert "cortex_flow_refresh_success 1.0" in lines


async def test_metrics_served_when_refresh_fails(
    start_admin: StartAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh that raises still serves the counters, flags refresh_success 0 and logs why."""

    async def refresh() -> None:
        raise ConnectionError("redis is gone")

    admin = await start_admin(refresh=refresh)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        status, text = await admin.get("/metrics")
    assert status == 200
    lines = text.splitlines()
    assert f'cortex_flow_processed_total{{consumer="r1",group="agents",stream="{HIGH}"}} 3.0' in (
        lines
    )
    assert "cortex_flow_refresh_success 0.0" in lines
    assert "cannot read pending/lag from redis (redis is gone)" in caplog.text


async def test_metrics_refresh_is_bounded_by_timeout(start_admin: StartAdmin) -> None:
    """A refresh that hangs is abandoned after the timeout and the scrape still answers."""
    cancelled = asyncio.Event()

    async def refresh() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    admin = await start_admin(refresh=refresh)
    admin.server.refresh_timeout = 0.05
    status, text = await admin.get("/metrics")
    assert status == 200
    assert "cortex_flow_refresh_success 0.0" in text.splitlines()
    assert cancelled.is_set()


def test_collector_heartbeat_age_uses_clock_and_skips_unseen_agents() -> None:
    """The heartbeat age is now - last_beat, and agents without a beat have no age."""
    stats = RunnerStats(runner="r1")
    stats.agents["harold"] = AgentState("harold", up=False, last_beat=1000.0, timeout=90)
    stats.agents["planner"] = AgentState("planner")
    registry, collector = build_registry(stats)
    collector.clock = lambda: 1125.0
    lines = render(registry).decode().splitlines()
    assert 'cortex_flow_agent_heartbeat_age_seconds{agent="harold"} 125.0' in lines
    assert 'cortex_flow_agent_up{agent="harold"} 0.0' in lines
    assert not any(
        line.startswith('cortex_flow_agent_heartbeat_age_seconds{agent="planner"}')
        for line in lines
    )


def test_collector_reports_failed_last_reload() -> None:
    """After a rejected reload, last_reload_success is 0 and its errors and time are exposed."""
    stats = RunnerStats(runner="r1")
    stats.reload.last_outcome = "rejected"
    stats.reload.last_at = 1700000100.0
    stats.reload.last_duration = 0.25
    stats.reload.last_errors = ["a", "b"]
    registry, _ = build_registry(stats)
    lines = render(registry).decode().splitlines()
    assert "cortex_flow_last_reload_success 0.0" in lines
    assert "cortex_flow_last_reload_errors 2.0" in lines
    assert "cortex_flow_last_reload_timestamp_seconds 1.7000001e+09" in lines
    assert "cortex_flow_last_reload_duration_seconds 0.25" in lines


def test_collector_uses_own_registry() -> None:
    """Two collectors live in separate registries, never in prometheus-client's global one."""
    from prometheus_client import REGISTRY

    first, _ = build_registry(RunnerStats(runner="a"))
    second, _ = build_registry(RunnerStats(runner="b"))
    assert first is not second
    assert not any(isinstance(c, RunnerCollector) for c in REGISTRY._collector_to_names)


# --- POST /reload ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "status"),
    [("applied", 200), ("unchanged", 200), ("rejected", 409), ("failed", 500)],
)
async def test_reload_status_follows_outcome(
    start_admin: StartAdmin, outcome: str, status: int
) -> None:
    """POST /reload returns reload()'s report with 200, 409 or 500 by its outcome."""
    report = {"outcome": outcome, "changes": ["group agents changed"], "errors": []}
    admin = await start_admin(reload=reload_returning(report))
    assert await admin.post("/reload") == (status, report)


async def test_reload_that_raises_answers_500(start_admin: StartAdmin) -> None:
    """A reload() that raises answers 500 with outcome failed and the error."""

    async def reload() -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    admin = await start_admin(reload=reload)
    assert await admin.post("/reload") == (500, {"outcome": "failed", "errors": ["disk on fire"]})


async def test_reload_unavailable_answers_404(start_admin: StartAdmin) -> None:
    """POST /reload answers 404 JSON when the runner gave no reload callable."""
    admin = await start_admin()
    status, body = await admin.post("/reload")
    assert status == 404
    assert body == {"error": "reload is not available in this runner", "path": "/reload"}


# --- binding -----------------------------------------------------------------------------


async def test_port_in_use_raises_clear_error(start_admin: StartAdmin) -> None:
    """Starting on a port already in use raises CortexFlowError naming the address and fix."""
    admin = await start_admin()
    port = admin.server.bound_port
    second = server_on("127.0.0.1", port)
    with pytest.raises(CortexFlowError) as caught:
        await second.start()
    assert str(caught.value) == (
        f"admin endpoint cannot listen on 127.0.0.1:{port}: address already in use; "
        'set admin.listen to another port or "off"'
    )
    await second.stop()  # a failed start leaves nothing to stop


async def test_non_loopback_host_refused_without_allow_public() -> None:
    """A non-loopback host is refused unless allow_public=True is passed."""
    server = server_on("0.0.0.0", 0)
    with pytest.raises(CortexFlowError, match=r"will not listen on 0\.0\.0\.0:0: .*not a loopback"):
        await server.start()


async def test_non_loopback_host_refused_without_a_token() -> None:
    """A non-loopback host is refused with allow_public=True but no token."""
    server = server_on("0.0.0.0", 0, allow_public=True)
    with pytest.raises(CortexFlowError) as caught:
        await server.start()
    assert str(caught.value) == (
        "admin endpoint will not listen on 0.0.0.0:0: it is not a loopback address; set "
        "admin.listen to 127.0.0.1:0 (and let a proxy expose it), or set admin.allow_public: "
        "true and admin.token: ${CORTEX_ADMIN_TOKEN}"
    )


async def test_public_binding_allowed_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    """With allow_public=True and a token a non-loopback host binds and logs a warning."""
    server = server_on("0.0.0.0", 0, allow_public=True, token=lambda: "t" * 16)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        async with server:
            port = server.bound_port
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/healthz") as response,
            ):
                assert response.status == 200
    assert f"listening on 0.0.0.0:{port}, which is not loopback" in caplog.text


def test_is_loopback() -> None:
    """localhost, 127.0.0.0/8 and ::1 are loopback; wildcard, LAN addresses and names are not."""
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.1.2.3", "::1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "example.com", ""]))
