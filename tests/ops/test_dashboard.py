"""The dashboard's routes on a running runner: pages, sign-in, CSRF, dead-letter actions."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from projects import wait_for, write_project
from redis_servers import free_port

from cortex_flow.flow.loader import load_project
from cortex_flow.ops.dashboard import CSRF_COOKIE, mount
from cortex_flow.ops.dashview import page_of, sparkline
from cortex_flow.runtime.runner import Runner

AGENTS = 120


def _flows(agents: int) -> str:
    names = ", ".join(f"a{i:04d}: {{heartbeat: {{interval: 5s}}}}" for i in range(agents))
    return f"""
        version: 1
        streams:
          tasks: {{key: "{{P}}tasks"}}
          dlq: {{key: "{{P}}dlq"}}
          beats: {{key: "{{P}}beats"}}
        heartbeats: {{stream: beats}}
        agents: {{{names}}}
        groups:
          router:
            stream: tasks
            dead_letter: dlq
            routes: [{{drop: true}}]
    """


async def _started(tmp_path: Path, redis_url: str, prefix: str, extra: str = "") -> Runner:
    port = free_port()
    config = write_project(
        tmp_path,
        _flows(AGENTS),
        prefix=prefix,
        config=(
            f"redis: {{url: '{redis_url}'}}\nflows: flows/\nrunner: {{name: ui2}}\n"
            f"reload: {{watch: false}}\nadmin: {{listen: '127.0.0.1:{port}'{extra}}}\n"
        ),
    )
    runner = Runner(load_project(config), watcher=None, block=0.1, ui=mount)
    await runner.start()
    return runner


@pytest.fixture
async def runner(tmp_path: Path, redis_url: str, prefix: str) -> AsyncIterator[Runner]:
    started = await _started(tmp_path, redis_url, prefix)
    try:
        yield started
    finally:
        await started.stop(2)


def _session() -> aiohttp.ClientSession:
    # a browser keeps cookies from 127.0.0.1; aiohttp's default jar refuses IP hosts
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def _base(runner: Runner) -> str:
    return f"http://127.0.0.1:{runner.admin.bound_port}"


async def test_the_page_pages_a_thousand_rows_and_lists_dead_letters(
    runner: Runner, redis_client: Any, prefix: str
) -> None:
    """/ui shows 50 agents a page with links on, and the dead letters with their error."""
    await redis_client.xadd(
        f"{prefix}dlq", {"n": "1", "dlq_stream": f"{prefix}tasks", "dlq_error": "boom: it broke"}
    )
    async with _session() as http, http.get(_base(runner) + "/ui?agents_page=2") as response:
        assert response.status == 200
        html = await response.text()
        assert response.cookies[CSRF_COOKIE]["samesite"] == "Strict"
    agents = re.findall(r'data-agent="(a\d+)"', html)
    assert agents == [f"a{i:04d}" for i in range(50, 100)]
    assert 'href="?agents_page=1" rel="prev"' in html
    assert 'href="?agents_page=3" rel="next"' in html
    assert "boom: it broke" in html
    assert 'data-count="dead_letters">1<' in html
    assert f"{AGENTS} agents" in html  # the topology draws many agents as one node
    assert "/ui/static/dashboard.js" in html and "https://" not in html  # nothing from a CDN


async def test_the_event_stream_pushes_the_sections(runner: Runner) -> None:
    """/ui/events answers text/event-stream whose first event carries every section."""
    async with _session() as http, http.get(_base(runner) + "/ui/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        line = await response.content.readline()
    assert line.startswith(b"data: {")
    for section in (b'"summary"', b'"topology"', b'"groups"', b'"agents"', b'"dlq"', b'"reloads"'):
        assert section in line


async def test_dead_letter_actions_need_the_csrf_token(
    runner: Runner, redis_client: Any, prefix: str
) -> None:
    """A replay without the cookie's token is refused (403); with it, the entry moves back."""
    dead = await redis_client.xadd(f"{prefix}dlq", {"n": "7", "dlq_stream": f"{prefix}tasks"})
    body = {"key": f"{prefix}dlq", "ids": [dead]}
    async with _session() as http:
        async with http.get(_base(runner) + "/ui") as response:
            token = response.cookies[CSRF_COOKIE].value
        url = _base(runner) + "/ui/dlq/replay"
        async with http.post(url, json=body) as response:
            assert response.status == 403
            assert (await response.json())["error"] == "missing or wrong CSRF token"
        async with http.post(url, json=body, headers={"X-CSRF-Token": "forged"}) as response:
            assert response.status == 403
        assert await redis_client.xlen(f"{prefix}dlq") == 1
        wrong = {"key": f"{prefix}tasks", "ids": ["1-0"]}
        async with http.post(url, json=wrong, headers={"X-CSRF-Token": token}) as response:
            assert response.status == 400  # not a dead-letter stream of this runner
        async with http.post(url, json=body, headers={"X-CSRF-Token": token}) as response:
            assert response.status == 200
            assert (await response.json())["done"] == 1
    assert await redis_client.xlen(f"{prefix}dlq") == 0
    await wait_for(lambda: runner.stats.groups["router"].key(f"{prefix}tasks").processed == 1)


async def test_purge_deletes_a_dead_letter(runner: Runner, redis_client: Any, prefix: str) -> None:
    """Purge removes the entry and publishes nothing."""
    dead = await redis_client.xadd(f"{prefix}dlq", {"n": "8", "dlq_stream": f"{prefix}tasks"})
    async with _session() as http:
        async with http.get(_base(runner) + "/ui") as response:
            token = response.cookies[CSRF_COOKIE].value
        body = {"key": f"{prefix}dlq", "ids": [dead]}
        headers = {"X-CSRF-Token": token}
        async with http.post(_base(runner) + "/ui/dlq/purge", json=body, headers=headers) as resp:
            assert (await resp.json())["done"] == 1
    assert await redis_client.xlen(f"{prefix}dlq") == 0
    assert await redis_client.xlen(f"{prefix}tasks") == 0


async def test_with_a_token_the_browser_signs_in_first(
    tmp_path: Path, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With admin.token, /ui sends a browser to /ui/login; the right token gives a cookie."""
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", "s3cret-token-for-tests")
    runner = await _started(tmp_path, redis_url, prefix, extra=", token: ${CORTEX_ADMIN_TOKEN}")
    try:
        async with _session() as http:
            async with http.get(_base(runner) + "/ui", allow_redirects=False) as response:
                assert response.status == 303
                assert response.headers["Location"] == "/ui/login"
            async with http.get(_base(runner) + "/ui/login") as response:
                assert response.status == 200
            async with http.get(_base(runner) + "/ui/static/dashboard.css") as response:
                assert response.status == 200
            async with http.post(_base(runner) + "/ui/login", json={"token": "nope"}) as response:
                assert response.status == 401
            async with http.get(_base(runner) + "/ui/sections") as response:
                assert response.status == 401
            async with http.post(
                _base(runner) + "/ui/login", json={"token": "s3cret-token-for-tests"}
            ) as response:
                assert response.status == 200
                assert response.cookies["cortex_flow_session"]["httponly"]
            async with http.get(_base(runner) + "/ui/sections") as response:
                assert response.status == 200
                assert "summary" in await response.json()
    finally:
        await runner.stop(2)


def test_pages_clamp_to_the_range_and_keep_other_parameters() -> None:
    """A page past the end shows the last one; links keep the other tables' pages."""
    page = page_of("agents", list(range(120)), {"agents_page": "9", "groups_page": "2"})
    assert (page.number, page.pages, page.rows[0], len(page.rows)) == (3, 3, 100, 20)
    assert page.next_url is None
    assert page.prev_url == "?agents_page=2&groups_page=2"
    assert page_of("agents", [], {"agents_page": "x"}).number == 1


def test_sparkline_scales_to_the_highest_rate() -> None:
    """The highest rate touches the top, zero the bottom."""
    svg = sparkline([0.0, 5.0, 10.0], width=100, height=20)
    assert 'points="0.0,19.0 50.0,10.0 100.0,1.0"' in svg
    assert "<polyline" not in sparkline([3.0])


async def test_an_open_event_stream_ends_cleanly_when_the_runner_stops(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """A page left open does not hold the stop up: its event stream ends, complete."""
    runner = await _started(tmp_path, redis_url, prefix)
    try:
        async with _session() as http, http.get(_base(runner) + "/ui/events") as response:
            assert (await response.content.readline()).startswith(b"data: ")
            stopping = asyncio.ensure_future(runner.stop(2))
            rest = await response.content.read()  # to the end: no payload error
            assert rest in (b"", b"\n") or rest.startswith(b"data: ")
            await stopping
    finally:
        await runner.stop(2)


class _Counting:
    """A view of a runner whose Redis client counts round trips (commands and pipelines)."""

    def __init__(self, url: str, config: Path) -> None:
        from redis.asyncio import Redis

        from cortex_flow.flow.topology import resolve
        from cortex_flow.runtime.stats import RunnerStats

        trips = self.trips = [0]

        class Counting(Redis):  # type: ignore[type-arg]
            async def execute_command(self, *args: Any, **options: Any) -> Any:
                trips[0] += 1
                return await super().execute_command(*args, **options)

            def pipeline(self, *args: Any, **kwargs: Any) -> Any:
                pipe = super().pipeline(*args, **kwargs)
                execute = pipe.execute

                async def counted(*a: Any, **k: Any) -> Any:
                    trips[0] += 1
                    return await execute(*a, **k)

                pipe.execute = counted  # type: ignore[method-assign]
                return pipe

        project = load_project(config)
        self.client = Counting.from_url(url, decode_responses=True)
        self.config = project.config
        self.stats = RunnerStats(runner="ui3")
        self.resolved = resolve(project.topology, "ui3")


async def _round_trips(tmp_path: Path, url: str, prefix: str, agents: int, groups: int) -> int:
    from cortex_flow.ops.dashboard import Dashboard

    folder = tmp_path / f"a{agents}"
    names = ", ".join(f"a{i:04d}: {{heartbeat: {{interval: 5s}}}}" for i in range(agents))
    streams = "".join(f'          s{g}: {{key: "{{P}}s{g}"}}\n' for g in range(groups))
    flow_groups = "".join(
        f"          g{g}:\n            stream: s{g}\n            dead_letter: dlq\n"
        f"            routes: [{{drop: true}}]\n"
        for g in range(groups)
    )
    flows = (
        "version: 1\nstreams:\n"
        + streams.replace("          ", "  ")
        + '  dlq: {key: "{P}dlq"}\n  beats: {key: "{P}beats"}\nheartbeats: {stream: beats}\n'
        + f"agents: {{{names}}}\ngroups:\n"
        + flow_groups.replace("          ", "  ")
    )
    config = write_project(folder, flows, prefix=prefix, config=f"redis: {{url: '{url}'}}\n")
    view = _Counting(url, config)
    for g in range(groups):
        await view.client.xgroup_create(f"{prefix}s{g}", f"g{g}", id="0", mkstream=True)
        await view.client.xadd(f"{prefix}s{g}", {"n": "1"})
    await view.client.xadd(f"{prefix}dlq", {"n": "1", "dlq_stream": f"{prefix}s0"})
    for a in range(agents):
        await view.client.xadd(f"{prefix}beats", {"agent": f"a{a:04d}", "kind": "agent"})
    try:
        view.trips[0] = 0
        sections = await Dashboard(view).sections({})
        assert "a0000" in sections["agents"]
        return view.trips[0]
    finally:
        await view.client.aclose()


async def test_round_trips_do_not_grow_with_agents_or_groups(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """A page costs as many round trips with 300 agents and 60 groups as with 3 and 2."""
    small = await _round_trips(tmp_path, redis_url, prefix + "small:", agents=3, groups=2)
    large = await _round_trips(tmp_path, redis_url, prefix + "large:", agents=300, groups=60)
    assert small == large, (small, large)
    assert large <= 4  # status's pipelined rounds (one more on Redis 6.2: no lag) and the DLQ
