"""The dashboard at the admin endpoint's ``/ui``: one server-rendered page kept live over SSE.

``GET /ui`` renders every section with Jinja2 (templates and static files ship in
``cortex_flow/ui``: no CDN, it works offline); ``GET /ui/events`` streams the same sections
as JSON ``{section id: html}`` every :data:`REFRESH` seconds and ``dashboard.js`` swaps them
in. What Redis knows comes from :func:`cortex_flow.ops.status.collect` (pipelined rounds, no
per-row calls), read at most once per refresh however many people watch.

Dead-letter replay and purge are ``POST /ui/dlq/{replay,purge}`` with a JSON body; besides
the admin guard (Host, cross-site, token), they need the CSRF token: a random value in the
``SameSite=Strict`` cookie :data:`CSRF_COOKIE`, sent back in the ``X-CSRF-Token`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jinja2
from aiohttp import web

from cortex_flow.flow.config import Config
from cortex_flow.flow.topology import Resolved
from cortex_flow.ops import dashview
from cortex_flow.ops.dlq import Filters, list_entries, purge, replay
from cortex_flow.ops.status import collect
from cortex_flow.runtime.adminguard import SESSION_COOKIE, session_value
from cortex_flow.runtime.stats import RunnerStats

__all__ = ["CSRF_COOKIE", "REFRESH", "Dashboard", "mount"]

log = logging.getLogger("cortex_flow.dashboard")

UI = Path(__file__).resolve().parent.parent / "ui"
REFRESH = 2.0  # seconds between two pushes of fresh sections
SAMPLES = 60  # throughput samples kept per group and key (two minutes at REFRESH)
CSRF_COOKIE = "cortex_flow_csrf"
CSRF_HEADER = "X-CSRF-Token"
SECTIONS = ("summary", "topology", "streams", "groups", "agents", "dlq", "reloads", "problems")


class RunnerView(Protocol):
    """What the dashboard reads of a :class:`~cortex_flow.runtime.runner.Runner`."""

    client: Any
    stats: RunnerStats
    config: Config

    @property
    def resolved(self) -> Resolved | None: ...


class Dashboard:
    """The ``/ui`` routes of one runner's admin endpoint."""

    def __init__(self, runner: RunnerView, *, refresh: float = REFRESH) -> None:
        self.runner = runner
        self.refresh = refresh
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(UI / "templates"),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["age"] = dashview.age
        self.rates: dict[tuple[str, str], deque[float]] = {}
        self._last: dict[tuple[str, str], int] = {}
        self._sampled_at: float | None = None
        self._data: dict[str, Any] | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        self._sampler: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()  # the endpoint is stopping: event streams end

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/ui", self.page)
        app.router.add_get("/ui/sections", self.sections_json)
        app.router.add_get("/ui/events", self.events)
        app.router.add_get("/ui/login", self.login_page)
        app.router.add_post("/ui/login", self.login)
        app.router.add_post("/ui/dlq/{action:replay|purge}", self.dlq_action)
        app.router.add_static("/ui/static/", UI / "static", append_version=False)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._closing)  # before connections close: SSE loops end
        app.on_cleanup.append(self._stop)

    # --- sampling and reading ------------------------------------------------------------

    async def _start(self, app: web.Application) -> None:
        self._sampler = asyncio.create_task(self._sample_forever(), name="dashboard:sample")

    async def _closing(self, app: web.Application) -> None:
        self._closed.set()

    async def _stop(self, app: web.Application) -> None:
        if self._sampler is not None:
            self._sampler.cancel()

    async def _sample_forever(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.refresh)

    def sample(self, now: float | None = None) -> None:
        """Turn the runner's processed counters into a rate per group and key."""
        now = time.monotonic() if now is None else now
        elapsed = None if self._sampled_at is None else now - self._sampled_at
        self._sampled_at = now
        for group, stats in list(self.runner.stats.groups.items()):
            for key, counters in list(stats.keys.items()):
                done = counters.processed + counters.failed
                before = self._last.get((group, key))
                self._last[(group, key)] = done
                if before is not None and elapsed:
                    rates = self.rates.setdefault((group, key), deque(maxlen=SAMPLES))
                    rates.append(max(0, done - before) / elapsed)

    async def data(self) -> dict[str, Any] | None:
        """What :func:`collect` read, at most :attr:`refresh` seconds old (None: starting)."""
        resolved = self.runner.resolved
        if resolved is None or self.runner.client is None:
            return None
        async with self._lock:
            if self._data is None or time.monotonic() - self._read_at >= self.refresh / 2:
                self._data = await collect(self.runner.client, resolved)
                self._read_at = time.monotonic()
            return self._data

    def forget(self) -> None:
        """Read Redis again on the next request (after a replay or purge)."""
        self._read_at = 0.0

    # --- rendering -----------------------------------------------------------------------

    async def sections(self, query: dict[str, str]) -> dict[str, str]:
        """Every section's HTML for the page ``query`` asks for."""
        try:
            data = await self.data()
        except Exception as exc:  # Redis down or refusing: say so where the counts go
            log.warning("dashboard: cannot read Redis: %s", exc)
            return {"summary": f'<p class="error">cannot read Redis: {html.escape(str(exc))}</p>'}
        resolved = self.runner.resolved
        if data is None or resolved is None:
            return {"summary": "<p>the runner is still starting</p>"}
        view = await self._view(data, resolved, query)
        template = self.env.get_template("sections.html")
        module = template.make_module(view)
        return {name: str(getattr(module, name)()) for name in SECTIONS}

    async def _view(
        self, data: dict[str, Any], resolved: Resolved, query: dict[str, str]
    ) -> dict[str, Any]:
        held: dict[str, list[dict[str, Any]]] = {}
        for row in data["retention"]:
            held.setdefault(row["key"], []).append(row)
        streams = []
        for row in data["streams"]:
            spec = resolved.streams.get(row["name"])
            max_len = spec.spec.max_len if spec is not None else None
            streams.append({**row, "max_len": max_len, "held": held.get(row["key"], [])})
        groups = [
            {
                **row,
                "spark": dashview.sparkline(list(self.rates.get((row["name"], row["key"]), ()))),
                "rate": (self.rates.get((row["name"], row["key"])) or [0.0])[-1],
            }
            for row in data["groups"]
        ]
        dlq_keys = [d["key"] for d in data["dead_letters"] if d.get("length")]
        total = sum(d.get("length") or 0 for d in data["dead_letters"])
        size = dashview.PAGE_SIZES["dlq"]
        wanted = dashview.page_of("dlq", [], query, total=total).number
        letters = await list_entries(self.runner.client, dlq_keys, Filters(limit=wanted * size))
        reloads = list(reversed(self.runner.stats.reload.history))
        return {
            "counts": dashview.summary(data),
            "data": data,
            "topology_svg": dashview.topology_svg(resolved),
            "streams_page": dashview.page_of("streams", streams, query),
            "groups_page": dashview.page_of("groups", groups, query),
            "agents_page": dashview.page_of("agents", data["agents"], query),
            "dlq_page": dashview.page_of("dlq", letters[(wanted - 1) * size :], query, total=total),
            "reload_rows": reloads,
            "now": time.time(),
        }

    # --- handlers ------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        token = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
        sections = await self.sections(dict(request.query))
        html = self.env.get_template("page.html").render(
            runner=self.runner.stats.runner,
            sections=sections,
            csrf=token,
            refresh=self.refresh,
        )
        response = web.Response(text=html, content_type="text/html")
        response.set_cookie(CSRF_COOKIE, token, httponly=False, samesite="Strict", path="/ui")
        return response

    async def sections_json(self, request: web.Request) -> web.Response:
        return web.json_response(await self.sections(dict(request.query)))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one ``data:`` line per refresh, of the sections that changed."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        query = dict(request.query)
        sent: dict[str, str] = {}
        try:
            while not self._closed.is_set():
                fresh = await self.sections(query)
                # only what changed since the last push: the topology rarely does
                changed = {k: v for k, v in fresh.items() if sent.get(k) != v}
                sent = fresh
                await response.write(f"data: {json.dumps(changed)}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), self.refresh)
        except ConnectionResetError:
            pass  # the page was closed
        return response

    async def login_page(self, request: web.Request) -> web.Response:
        html = self.env.get_template("login.html").render(runner=self.runner.stats.runner)
        return web.Response(text=html, content_type="text/html")

    async def login(self, request: web.Request) -> web.Response:
        """Trade the admin token (JSON ``{"token": ...}``) for a session cookie."""
        expected = self.runner.config.admin.token
        body = await _json_body(request)
        given = str(body.get("token", ""))
        if expected is None:
            return web.json_response({"ok": True})
        if not hmac.compare_digest(given.encode(), expected.encode()):
            log.warning("dashboard: wrong token from %s", request.remote)
            return web.json_response({"error": "wrong token"}, status=401)
        response = web.json_response({"ok": True})
        response.set_cookie(
            SESSION_COOKIE, session_value(expected), httponly=True, samesite="Strict", path="/"
        )
        return response

    async def dlq_action(self, request: web.Request) -> web.Response:
        """Replay or purge dead letters: ``{"key": dlq key, "ids": [entry ids]}``."""
        action = request.match_info["action"]
        cookie = request.cookies.get(CSRF_COOKIE, "")
        sent = request.headers.get(CSRF_HEADER, "")
        if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
            return web.json_response(
                {"error": "missing or wrong CSRF token", "fix": "reload the page and try again"},
                status=403,
            )
        body = await _json_body(request)
        key, ids = body.get("key"), body.get("ids")
        resolved = self.runner.resolved
        known = {g.dead_letter for g in resolved.groups.values()} if resolved else set()
        if not isinstance(key, str) or key not in known or not isinstance(ids, list) or not ids:
            return web.json_response(
                {"error": "name a dead-letter stream of this runner as key and entry ids as ids"},
                status=400,
            )
        entries = await list_entries(
            self.runner.client, [key], Filters(ids=tuple(str(i) for i in ids))
        )
        do: Callable[..., Any] = replay if action == "replay" else purge
        outcome = await do(self.runner.client, entries)
        log.info(
            "dashboard: %s of %d dead letter(s) in %s by %s: %d done, %d gone meanwhile",
            action,
            len(ids),
            key,
            request.remote,
            outcome.done,
            outcome.missing + len(ids) - len(entries),
        )
        self.forget()
        return web.json_response(
            {"action": action, "done": outcome.done, "skipped": outcome.skipped}
        )


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(reason="send a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="send a JSON object")
    return body


def mount(runner: RunnerView) -> Callable[[web.Application], None]:
    """What :class:`~cortex_flow.runtime.runner.Runner` takes as ``ui``."""
    return Dashboard(runner).mount
