"""The admin endpoint: ``/healthz``, ``/readyz``, ``/metrics``, ``/topology``, ``POST /reload``.

A small aiohttp server owned by the runner. It decides nothing itself: readiness
comes from the runner's ``ready()``, reloads from its ``reload()``, and the
Redis-derived gauges from its ``refresh()``. It listens on loopback unless told
otherwise. Who may call it (Host, cross-site, token) is checked in front of every
route by :mod:`cortex_flow.runtime.adminguard`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.config import LOOPBACK_NAMES, is_loopback
from cortex_flow.runtime.adminguard import guard
from cortex_flow.runtime.metrics import CONTENT_TYPE, SUCCESSFUL_RELOADS, build_registry, render
from cortex_flow.runtime.stats import RunnerStats

__all__ = ["REFRESH_TIMEOUT", "AdminServer", "is_loopback", "json_errors"]

# a scrape must answer even when Redis is slow; gauges are then served stale
REFRESH_TIMEOUT = 2.0

# how long stop() lets an in-flight request (a reload, a scrape) finish
SHUTDOWN_TIMEOUT = 5.0

ENDPOINTS = {
    "GET /healthz": "200 while the process runs",
    "GET /readyz": "200 when ready to take messages, 503 with the reasons otherwise",
    "GET /metrics": "Prometheus metrics",
    "GET /topology": "the flows and settings this runner runs now (secrets redacted)",
    "POST /reload": "reload config and flows; 200 applied or unchanged, 409 rejected, 500 failed",
    "GET /ui": "the dashboard (a web page)",
}


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda v: json.dumps(v, default=str))


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths and wrong methods answer JSON like every other endpoint."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json({"error": exc.reason, "path": request.path}, status=exc.status)


class AdminServer:
    """The admin HTTP endpoint of one runner.

    ``ready`` returns ``(is_ready, detail)``; ``reload`` returns the reload report
    (with an ``outcome`` of applied / unchanged / rejected / failed); ``refresh``
    updates the Redis-derived gauges in ``stats`` before a scrape. ``reload`` and
    ``refresh`` may be ``None`` when the runner has no such ability. ``topology``
    returns what ``GET /topology`` serves (:func:`cortex_flow.flow.exposed.topology_doc`),
    ``None`` while nothing runs yet. ``port`` 0 picks a free port (see :attr:`bound_port`).
    ``hosts`` (the ``Host:`` names answered; default loopback and ``host``) and ``token``
    are called per request, so a reload can change them. ``extend`` adds routes to the
    application (the dashboard).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        stats: RunnerStats,
        ready: Callable[[], tuple[bool, dict[str, Any]]],
        reload: Callable[[], Awaitable[dict[str, Any]]] | None,
        refresh: Callable[[], Awaitable[None]] | None,
        log: logging.Logger,
        allow_public: bool = False,
        refresh_timeout: float = REFRESH_TIMEOUT,
        topology: Callable[[], dict[str, Any] | None] | None = None,
        hosts: Callable[[], Collection[str]] | None = None,
        token: Callable[[], str | None] | None = None,
        extend: Callable[[web.Application], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.stats = stats
        self.allow_public = allow_public
        self.refresh_timeout = refresh_timeout
        self._ready = ready
        self._reload = reload
        self._refresh = refresh
        self._topology = topology
        self._log = log
        default_hosts = frozenset((*LOOPBACK_NAMES, host.lower()))
        self._hosts = hosts or (lambda: default_hosts)
        self._token = token or (lambda: None)
        self._extend = extend
        self.registry, self.collector = build_registry(stats)
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    @property
    def where(self) -> str:
        """``host:port`` as configured (``[::1]:port`` for IPv6)."""
        return _where(self.host, self.port)

    @property
    def bound_port(self) -> int:
        """The port actually listened on (differs from ``port`` when that was 0)."""
        if self._bound_port is None:
            raise RuntimeError("the admin endpoint is not started")
        return self._bound_port

    def app(self) -> web.Application:
        """The aiohttp application (routes and error handling), without a listener."""
        app = web.Application(middlewares=[guard(self._hosts, self._token, self._log), json_errors])
        app.router.add_get("/", self._index)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/topology", self._topology_handler)
        app.router.add_post("/reload", self._reload_handler)
        if self._extend is not None:
            self._extend(app)  # e.g. the dashboard (cortex_flow.ops.dashboard) at /ui
        return app

    async def start(self) -> None:
        """Listen on ``host:port``; raise :class:`CortexFlowError` when that is refused."""
        if self._runner is not None:
            return
        public = not is_loopback(self.host)
        if public and not (self.allow_public and self._token()):
            raise CortexFlowError(
                f"admin endpoint will not listen on {self.where}: it is not a loopback address; "
                f"set admin.listen to 127.0.0.1:{self.port} (and let a proxy expose it), or set "
                "admin.allow_public: true and admin.token: ${CORTEX_ADMIN_TOKEN}"
            )
        # no access log: a scrape every few seconds would bury the lines that matter
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            if exc.errno == errno.EADDRINUSE:
                reason = "address already in use"
            else:
                reason = exc.strerror or str(exc)
            raise CortexFlowError(
                f"admin endpoint cannot listen on {self.where}: {reason}; "
                'set admin.listen to another port or "off"'
            ) from exc
        self._runner = runner
        self._bound_port = int(runner.addresses[0][1])
        listening = _where(self.host, self._bound_port)
        if public:
            self._log.warning(
                "admin endpoint listening on %s, which is not loopback: anyone who can reach it "
                "can read /metrics; POST /reload takes the admin token",
                listening,
            )
        else:
            self._log.info(
                "admin endpoint on http://%s (/healthz, /readyz, /metrics, POST /reload)", listening
            )

    async def stop(self) -> None:
        """Stop listening, letting in-flight requests finish briefly. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._bound_port = None

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- handlers ------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        offered = {
            "POST /reload": self._reload,
            "GET /topology": self._topology,
            "GET /ui": self._extend,
        }
        endpoints = {k: v for k, v in ENDPOINTS.items() if offered.get(k, True)}
        return _json({"runner": self.stats.runner, "endpoints": endpoints})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ready, detail = self._ready()
        except Exception as exc:
            # a readiness check that cannot answer must not report ready
            self._log.exception("readiness check failed")
            ready, detail = False, {"error": f"readiness check failed: {exc}"}
        status = "ready" if ready else "not ready"
        return _json({"status": status, "detail": detail}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._refresh is not None:
            self.collector.refresh_success = await self._refresh_gauges(self._refresh)
        return web.Response(body=render(self.registry), headers={"Content-Type": CONTENT_TYPE})

    async def _refresh_gauges(self, refresh: Callable[[], Awaitable[None]]) -> bool:
        try:
            await asyncio.wait_for(refresh(), self.refresh_timeout)
        except TimeoutError:
            self._log.warning(
                "metrics scrape: reading pending/lag from redis took over %gs; "
                "serving the previous values",
                self.refresh_timeout,
            )
            return False
        except Exception as exc:
            self._log.warning(
                "metrics scrape: cannot read pending/lag from redis (%s); "
                "serving the previous values",
                exc,
            )
            return False
        return True

    async def _topology_handler(self, request: web.Request) -> web.Response:
        if self._topology is None:
            raise web.HTTPNotFound(reason="this runner does not serve its topology")
        doc = self._topology()
        if doc is None:
            return _json({"error": "the runner is still starting"}, status=503)
        return _json(doc)

    async def _reload_handler(self, request: web.Request) -> web.Response:
        if self._reload is None:
            raise web.HTTPNotFound(reason="reload is not available in this runner")
        self._log.info("reload requested through the admin endpoint by %s", request.remote)
        try:
            report = await self._reload()
        except Exception as exc:
            self._log.exception("reload requested through the admin endpoint failed")
            return _json({"outcome": "failed", "errors": [str(exc)]}, status=500)
        outcome = report.get("outcome")
        if outcome in SUCCESSFUL_RELOADS:
            status = 200
        elif outcome == "rejected":
            status = 409
        else:
            status = 500
        return _json(report, status=status)
