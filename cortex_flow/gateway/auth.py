"""Who is calling the gateway: the ``Host:`` check, then the agent a bearer token names.

Every route but the open ones (:attr:`Route.auth` false) takes ``Authorization: Bearer
<token>`` (a browser's WebSocket, which cannot send it, offers the subprotocol
``cortex-flow.bearer.<token>``); the token is compared with every agent's
(``agents.X.token``) in constant time, all of them each time, so the time taken says
nothing about which came close. The token is never logged. What the named agent may do
(its own inbox, the streams in ``may_send``) is the handlers' to check (:func:`forbidden`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Collection
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from cortex_flow.flow.loader import Project
from cortex_flow.runtime.adminguard import refuse, request_host

__all__ = ["AGENT", "PROTOCOL", "agent_of", "authenticate", "forbidden"]

# set on the request: the token's agent (a plain string key before aiohttp had RequestKey)
PROTOCOL = "cortex-flow"  # the WebSocket subprotocol the gateway answers
BEARER_PROTOCOL = "cortex-flow.bearer."
AGENT: Any = getattr(web, "RequestKey", lambda name, _: f"cortex_flow.{name}")("agent", str)


def agent_of(project: Project, sent: str) -> str | None:
    """The agent whose token is ``sent`` (the whole ``Authorization`` value), or None."""
    scheme, _, given = sent.partition(" ")
    token = given.strip().encode()
    found = None
    for name, spec in sorted(project.topology.agents.items()):
        expected = spec.token
        # every agent compared, whatever matched: constant time over the list
        if expected is not None and hmac.compare_digest(token, expected.encode()):
            found = name
    return found if scheme.lower() == "bearer" else None


def authenticate(
    hosts: Callable[[], Collection[str]],
    project: Callable[[], Project],
    open_paths: Collection[str],
    log: logging.Logger,
) -> Middleware:
    """The middleware; ``hosts`` and ``project`` are read per request (a reload changes them)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        allowed = hosts()
        host = request.headers.get("Host", "")
        if "*" not in allowed and request_host(host) not in allowed:
            log.warning(
                "gateway: refused %s %s with Host %r from %s (not in gateway.allowed_hosts)",
                request.method,
                request.path,
                host[:100],
                request.remote,
            )
            return refuse(
                403,
                f"Host {host!r} is not allowed",
                "use one of " + ", ".join(sorted(allowed)) + " or list the name in "
                "gateway.allowed_hosts",
                request,
            )
        resource = request.match_info.route.resource
        if (resource.canonical if resource is not None else request.path) in open_paths:
            return await handler(request)
        sent = request.headers.get("Authorization", "") or _from_protocols(request)
        agent = agent_of(project(), sent) if sent else None
        if agent is None:
            log.warning(
                "gateway: refused %s %s from %s: %s",
                request.method,
                request.path,
                request.remote,
                "not an agent's token" if sent else "no token",
            )
            return refuse(
                401,
                "not an agent's token" if sent else "this endpoint needs an agent's token",
                "send Authorization: Bearer <token>, the value of agents.<name>.token in "
                "the flows (from its ${VAR})",
                request,
            )
        request[AGENT] = agent
        return await handler(request)

    return check


def _from_protocols(request: web.Request) -> str:
    """A browser's WebSocket cannot send headers: it offers the token as the subprotocol
    ``cortex-flow.bearer.<token>`` beside ``cortex-flow`` (the one the gateway answers)."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    for protocol in offered.split(","):
        name = protocol.strip()
        if name.startswith(BEARER_PROTOCOL):
            return "Bearer " + name[len(BEARER_PROTOCOL) :]
    return ""


def forbidden(request: web.Request, error: str, fix: str) -> web.Response:
    """403 for an agent that is known but may not do this; logged without the token."""
    logging.getLogger("cortex_flow.gateway").warning(
        "gateway: refused %s %s for agent %s: %s",
        request.method,
        request.path,
        request[AGENT],
        error,
    )
    return refuse(403, error, fix, request)
