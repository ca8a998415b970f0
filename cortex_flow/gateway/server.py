"""The gateway: HTTP and WebSocket access to the flows for agents that do not speak Redis.

Served by ``cortex-flow run`` when ``gateway.listen`` is set, or on its own by
``cortex-flow gateway``. Its routes come from :data:`~cortex_flow.gateway.routes.ROUTES`
(which also gives the OpenAPI document); who may call them is checked in front of every
route (:mod:`cortex_flow.gateway.auth`); unknown paths, wrong methods and bodies over
``gateway.max_body`` answer JSON (:func:`cortex_flow.runtime.admin.json_errors`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.gatewayconfig import GatewaySettings
from cortex_flow.flow.loader import Project
from cortex_flow.flow.models import StreamSpec
from cortex_flow.gateway.a2aserve import A2AServer, declared
from cortex_flow.gateway.a2ashapes import agent_card
from cortex_flow.gateway.a2atasks import TaskRecords
from cortex_flow.gateway.auth import AGENT, PROTOCOL, authenticate, forbidden
from cortex_flow.gateway.bodies import bad as _bad
from cortex_flow.gateway.bodies import body as _body
from cortex_flow.gateway.bodies import json_response as _json
from cortex_flow.gateway.idempotency import idempotency_key, publish_once
from cortex_flow.gateway.inbox import InboxSession
from cortex_flow.gateway.openapi import document
from cortex_flow.gateway.requests import Asker, relay, timeout_of
from cortex_flow.gateway.routes import ROUTES
from cortex_flow.gateway.socket import serve_socket
from cortex_flow.ops.send import TargetError, publish, target_key
from cortex_flow.runtime.admin import json_errors
from cortex_flow.runtime.adminguard import refuse
from cortex_flow.wire.codec import encode
from cortex_flow.wire.heartbeats import beat_fields, encode_beat

__all__ = ["Gateway"]

SHUTDOWN_TIMEOUT = 5.0
MAX_WAIT = 60.0  # longest long poll
REPLACED = 4000  # WebSocket close code: the agent connected again


class Gateway:
    """One gateway listener. ``project`` is read per request (a reload may change tokens
    and streams); ``connect`` opens the Redis client the first time one is needed."""

    def __init__(
        self,
        project: Callable[[], Project],
        connect: Callable[[], Awaitable[Any]],
        *,
        log: logging.Logger | None = None,
    ) -> None:
        self._project = project
        self._connect = connect
        self._client: Any = None
        self._connecting = asyncio.Lock()
        self._log = log or logging.getLogger("cortex_flow.gateway")
        self._polls: dict[str, InboxSession] = {}
        self._poll_locks: dict[str, asyncio.Lock] = {}
        # the one WebSocket reading each agent's inbox, and an event set when it has ended
        self._sockets: dict[str, tuple[web.WebSocketResponse, asyncio.Event]] = {}
        self._socket_locks: dict[str, asyncio.Lock] = {}
        self._runner: web.AppRunner | None = None
        self._asker: Asker | None = None  # for the project it was made for
        self._a2a = A2AServer(TaskRecords())
        self.bound_port: int | None = None

    @property
    def settings(self) -> GatewaySettings:
        return self._project().config.gateway

    async def redis(self) -> Any:
        async with self._connecting:
            if self._client is None:
                self._client = await self._connect()
            return self._client

    def app(self) -> web.Application:
        """The aiohttp application, without a listener (tests serve it themselves)."""
        open_paths = frozenset(r.path for r in ROUTES if not r.auth)
        app = web.Application(
            client_max_size=self.settings.max_body,
            middlewares=[
                json_errors,
                authenticate(lambda: self.settings.hosts, self._project, open_paths, self._log),
            ],
        )
        for route in ROUTES:
            app.router.add_route(route.method, route.path, getattr(self, "_" + route.handler))
        return app

    async def start(self) -> None:
        """Listen on ``gateway.listen`` (with TLS when ``gateway.tls`` is set)."""
        settings = self.settings
        where = settings.host_port
        if where is None:
            raise CortexFlowError("gateway.listen is off; set it, e.g. 127.0.0.1:8480")
        context = self._tls(settings)
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, where[0], where[1], ssl_context=context).start()
        except OSError as exc:
            await runner.cleanup()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else str(exc)
            raise CortexFlowError(
                f"gateway cannot listen on {settings.listen}: {reason}; set gateway.listen "
                'to another port or "off"'
            ) from exc
        self._runner = runner
        self.bound_port = int(runner.addresses[0][1])
        scheme = "https" if context else "http"
        self._log.info("gateway on %s://%s:%d", scheme, where[0], self.bound_port)

    def _tls(self, settings: GatewaySettings) -> ssl.SSLContext | None:
        if settings.tls is None:
            return None
        base = self._project().base_dir
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(base / settings.tls.cert, base / settings.tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise CortexFlowError(
                f"gateway.tls: cannot load {settings.tls.cert} and {settings.tls.key}: {exc}; "
                "give a PEM certificate chain and its private key"
            ) from exc
        return context

    async def stop(self) -> None:
        """Stop listening and close the Redis client. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._a2a.records.close()
        asker, self._asker = self._asker, None
        if asker is not None:
            await asker.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- handlers ------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return _json({"endpoints": {f"{r.method} {r.path}": r.summary for r in ROUTES}})

    async def _openapi(self, request: web.Request) -> web.Response:
        return _json(document())

    async def _publish(self, request: web.Request) -> web.Response:
        agent: str = request[AGENT]
        msg = await _body(request, required=True)
        if isinstance(msg, web.Response):
            return msg
        target = self._target(request, agent)
        if isinstance(target, web.Response):
            return target
        key, spec = target
        client = await self.redis()
        once = request.headers.get("Idempotency-Key")
        if once:
            remember = idempotency_key(key, agent, once)
            fields = encode(spec.codec, msg)
            entry_id, replayed = await publish_once(
                client, key, remember, fields, self.settings.idempotency_ttl
            )
            return _json({"id": entry_id, "key": key, "replayed": replayed}, status=202)
        entry_id = await publish(client, key, spec, msg)
        return _json({"id": entry_id, "key": key}, status=202)

    async def asker(self) -> Asker:
        """The requester for the project as it is now: a reload that keeps the namespace
        keeps its reply stream (the requests in flight get their replies); another makes
        a new one."""
        project = self._project()
        asker = self._asker
        if asker is not None and asker.project is not project:
            if asker.rebind(project):
                return asker
            await asker.close()
            asker = None
        if asker is None:
            asker = self._asker = Asker(project, await self.redis())
        return asker

    async def _request(self, request: web.Request) -> web.Response:
        msg = await _body(request, required=True)
        if isinstance(msg, web.Response):
            return msg
        target = self._target(request, request[AGENT])  # may_send and the key, as publish
        if isinstance(target, web.Response):
            return target
        timeout = timeout_of(request, self.settings.max_request_timeout)
        if isinstance(timeout, web.Response):
            return timeout
        return await relay(request, await self.asker(), msg, timeout)

    async def _a2a_card(self, request: web.Request) -> web.Response:
        spec = declared(request, self._project())
        if isinstance(spec, web.Response):
            return spec
        name = request.match_info["agent"]
        return _json(agent_card(name, spec, f"{request.scheme}://{request.host}/a2a/{name}"))

    async def _a2a_rpc(self, request: web.Request) -> web.StreamResponse:
        spec = declared(request, self._project())
        if isinstance(spec, web.Response):
            return spec
        assert spec.a2a is not None
        caller: str = request[AGENT]
        allowed = self._project().topology.agents[caller].may_send
        if spec.a2a.stream not in allowed:
            name = request.match_info["agent"]
            return forbidden(
                request,
                f"agent {caller} may not call A2A agent {name}: its stream {spec.a2a.stream} "
                "is not in its may_send",
                f"add {spec.a2a.stream} to agents.{caller}.may_send in the flows",
            )
        longest = self.settings.max_request_timeout
        return await self._a2a.call(
            request, request.match_info["agent"], spec, await self.asker(), longest
        )

    def _target(self, request: web.Request, agent: str) -> tuple[str, StreamSpec] | web.Response:
        """The key the request's stream and query name, if ``agent`` may send there:
        400 with ``cortex-flow send``'s words when it names none, 403 past ``may_send``."""
        stream = request.match_info["stream"]
        project = self._project()
        extra = {}
        for var in request.query.getall("var", []):
            name, eq, value = var.partition("=")
            if not eq:
                return _bad(request, f"var takes NAME=VALUE, got {var!r}", "var")
            extra[name] = value
        try:
            target = target_key(
                project,
                stream,
                priority=request.query.get("priority"),
                agent=request.query.get("agent"),
                extra=extra,
            )
        except TargetError as exc:
            body = {"error": str(exc), "about": exc.about, "choices": exc.choices}
            return _json({**body, "path": request.path}, status=400)
        allowed = project.topology.agents[agent].may_send
        if stream not in allowed:
            return forbidden(
                request,
                f"agent {agent} may not send to stream {stream}",
                f"add {stream} to agents.{agent}.may_send in the flows "
                f"(now: [{', '.join(allowed)}])",
            )
        return target

    def _own(self, request: web.Request) -> web.Response | str:
        agent: str = request[AGENT]
        named = request.match_info["agent"]
        if named != agent:
            return forbidden(
                request,
                f"the token is agent {agent}'s, not agent {named}'s",
                f"use /v1/agents/{agent}/... with this token, or agent {named}'s own token",
            )
        return agent

    async def _heartbeat(self, request: web.Request) -> web.Response:
        agent = self._own(request)
        if isinstance(agent, web.Response):
            return agent
        body = await _body(request, required=False)
        if isinstance(body, web.Response):
            return body
        status = str(body.get("status", "ok"))
        topo = self._project().topology
        if topo.heartbeats is None:
            return refuse(
                409, "the flows declare no heartbeats", "add heartbeats: {stream: ...}", request
            )
        spec = topo.streams[topo.heartbeats.stream]
        key, _ = target_key(self._project(), topo.heartbeats.stream)
        client = await self.redis()
        entry_id = await client.xadd(
            key, encode_beat(spec.codec, beat_fields(agent, "agent", status))
        )
        return _json({"id": entry_id}, status=202)

    async def _session(self, request: web.Request, agent: str) -> InboxSession | web.Response:
        try:
            session = InboxSession(
                await self.redis(), self._project(), agent, self.settings.max_credit, self._log
            )
        except CortexFlowError as exc:
            return refuse(409, str(exc), "declare the agent's inbox in the flows", request)
        await session.start()
        return session

    async def _inbox(self, request: web.Request) -> web.StreamResponse:
        agent = self._own(request)
        if isinstance(agent, web.Response):
            return agent
        ws = web.WebSocketResponse(
            heartbeat=30.0, max_msg_size=self.settings.max_body, protocols=(PROTOCOL,)
        )
        if not ws.can_prepare(request).ok:
            return await self._poll(request, agent)
        async with self._socket_locks.setdefault(agent, asyncio.Lock()):
            await self._take_over(agent)
            session = await self._session(request, agent)
            if isinstance(session, web.Response):
                return session
            self._polls.pop(agent, None)  # what a long poll held comes again here
            ended = asyncio.Event()
            self._sockets[agent] = (ws, ended)
        try:
            await ws.prepare(request)
            self._log.info("gateway: agent %s reads its inbox over a WebSocket", agent)
            await serve_socket(ws, session, agent, self._log)
        finally:
            ended.set()
            if self._sockets.get(agent, (None,))[0] is ws:
                del self._sockets[agent]
        return ws

    async def _take_over(self, agent: str) -> None:
        """Close the agent's earlier socket and wait until it has stopped reading: two
        readers as one consumer would each get the other's pending entries."""
        earlier = self._sockets.pop(agent, None)
        if earlier is None:
            return
        old, ended = earlier
        self._log.info("gateway: agent %s connected again; closing its earlier socket", agent)
        await old.close(code=REPLACED, message=b"replaced by a newer connection of this agent")
        await ended.wait()

    async def _polling(self, request: web.Request, agent: str) -> InboxSession | web.Response:
        """The agent's long-poll session: one per agent, kept between polls."""
        session = self._polls.get(agent)
        if session is None:
            made = await self._session(request, agent)
            if isinstance(made, web.Response):
                return made
            session = self._polls[agent] = made
        return session

    async def _poll(self, request: web.Request, agent: str) -> web.Response:
        try:
            count = int(request.query.get("count", "10"))
            wait = min(float(request.query.get("wait", "10")), MAX_WAIT)
        except ValueError:
            return _bad(
                request, "count must be a whole number and wait a number of seconds", "query"
            )
        if count < 1 or wait < 0:
            return _bad(request, "count must be at least 1 and wait at least 0", "query")
        lock = self._poll_locks.setdefault(agent, asyncio.Lock())
        async with lock:  # one read at a time per agent: the reader keeps a cursor
            session = await self._polling(request, agent)
            if isinstance(session, web.Response):
                return session
            messages = await session.take(count, wait)
        return _json({"messages": messages, "room": session.room})

    async def _inbox_ack(self, request: web.Request) -> web.Response:
        agent = self._own(request)
        if isinstance(agent, web.Response):
            return agent
        body = await _body(request, required=True)
        if isinstance(body, web.Response):
            return body
        ids = body.get("ack", [])
        if isinstance(ids, str):
            ids = [ids]
        fail = body.get("fail")
        if not isinstance(ids, list) or (fail is None and not ids):
            return _bad(request, 'give {"ack": [ids]} and/or {"fail": id, "error": "why"}', "body")
        session = await self._polling(request, agent)
        if isinstance(session, web.Response):
            return session
        acked, unknown = await session.ack([str(i) for i in ids])
        failed = []
        if fail is not None:
            if await session.fail(str(fail), str(body.get("error") or "failed at the agent")):
                failed.append(str(fail))
            else:
                unknown.append(str(fail))
        return _json({"acked": acked, "failed": failed, "unknown": unknown})
