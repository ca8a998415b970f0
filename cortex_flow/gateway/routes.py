"""The gateway's routes, written once: the aiohttp router and the OpenAPI document are
both built from :data:`ROUTES`, so the document cannot drift from what is served."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ROUTES", "Param", "Route"]


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "path", "query" or "header"
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True)
class Route:
    """One endpoint: ``handler`` names the :class:`~cortex_flow.gateway.server.Gateway`
    method that serves it; ``auth`` whether it takes an agent's token."""

    method: str
    path: str
    handler: str
    summary: str
    responses: dict[int, str]
    params: tuple[Param, ...] = ()
    body: str | None = None  # what the JSON body holds, when there is one
    auth: bool = True
    websocket: bool = False


_STREAM = Param("stream", "path", "A stream the flows declare.", required=True)
_AGENT = Param("agent", "path", "The agent the token belongs to.", required=True)
_KEY_VARS = (
    Param("priority", "query", "Priority level of a priority stream."),
    Param("agent", "query", "The agent of a per-agent stream (its key per agent)."),
    Param(
        "var",
        "query",
        "Another key variable, NAME=VALUE; repeat for more.",
        {"type": "array", "items": {"type": "string"}},
    ),
)
_REFUSED = {
    401: "No token, or not an agent's token.",
    403: "The token's agent may not do this (another agent, or a stream not in may_send).",
}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/", "index", "What this gateway serves.", {200: "The endpoints."}, auth=False),
    Route(
        "GET",
        "/openapi.json",
        "openapi",
        "This document.",
        {200: "The OpenAPI document."},
        auth=False,
    ),
    Route(
        "POST",
        "/v1/streams/{stream}",
        "publish",
        "Publish one message to a stream, as `cortex-flow send` does.",
        {
            202: "Published: `{id, key}`, the entry ID (the first one's, for a repeated "
            "Idempotency-Key, with `replayed: true`).",
            400: "Not a JSON object, or the message names no key: `{error, about, choices}` "
            "with the words of `cortex-flow send`.",
            413: "The body is larger than gateway.max_body.",
            415: "The body is not application/json.",
            **_REFUSED,
        },
        params=(
            _STREAM,
            *_KEY_VARS,
            Param(
                "Idempotency-Key",
                "header",
                "Publish once per key: a repeat within gateway.idempotency_ttl answers the "
                "first entry's ID and publishes nothing.",
            ),
        ),
        body="The message: a JSON object (its fields, or the `data` of a json stream).",
    ),
    Route(
        "POST",
        "/v1/requests/{stream}",
        "request",
        "Publish a request (request/reply) and wait for its reply.",
        {
            200: "The reply: `{reply}`, what the handler returned.",
            400: "Not a JSON object, a bad timeout, or the message names no key, or no "
            "group answers the stream: `{error, about}`.",
            409: "The request was canceled.",
            413: "The body is larger than gateway.max_body.",
            415: "The body is not application/json.",
            502: "The request failed: dead-lettered or expired; `{error, reason, id}` with "
            "the dead-letter reason.",
            504: "No reply within the timeout.",
            **_REFUSED,
        },
        params=(
            _STREAM,
            Param(
                "timeout",
                "query",
                "Seconds to wait for the reply (default 30, at most "
                "gateway.max_request_timeout, 300 unless set).",
                {"type": "number", "exclusiveMinimum": 0},
            ),
            *_KEY_VARS,
        ),
        body="The request message: a JSON object (its fields, or the `data` of a json stream).",
    ),
    Route(
        "POST",
        "/v1/agents/{agent}/heartbeat",
        "heartbeat",
        "Publish one heartbeat of the agent.",
        {202: "Beat published: `{id}`.", 409: "The flows declare no heartbeats.", **_REFUSED},
        params=(_AGENT,),
        body='Optional: `{"status": "ok"}`.',
    ),
    Route(
        "GET",
        "/v1/agents/{agent}/inbox",
        "inbox",
        "Read the agent's inbox: a WebSocket (Upgrade) with credit-based flow control, or "
        "one long poll (`count`, `wait`) without Upgrade.",
        {
            101: 'WebSocket: send `{"credit": N}`, get `{"type": "message", id, msg, '
            'deliveries}`, answer `{"ack": id}` or `{"fail": id, "error": "..."}`.',
            200: "Long poll: `{messages: [...]}`; ack them with POST .../inbox/ack.",
            **_REFUSED,
        },
        params=(
            _AGENT,
            Param(
                "count",
                "query",
                "Long poll: most messages to return (default 10).",
                {"type": "integer", "minimum": 1},
            ),
            Param(
                "wait",
                "query",
                "Long poll: seconds to wait for one (default 10, at most 60).",
                {"type": "number", "minimum": 0, "maximum": 60},
            ),
        ),
        websocket=True,
    ),
    Route(
        "GET",
        "/a2a/{agent}/.well-known/agent-card.json",
        "a2a_card",
        "The A2A agent card of an agent declared with `a2a:`.",
        {200: "The agent card (A2A protocol 0.3).", 404: "No such agent, or it has no `a2a:`."},
        params=(Param("agent", "path", "An agent declared with `a2a:`.", required=True),),
        auth=False,
    ),
    Route(
        "POST",
        "/a2a/{agent}",
        "a2a_rpc",
        "A2A JSON-RPC 2.0: `message/send`, `message/stream` (server-sent events), "
        "`tasks/get`, `tasks/cancel`; the token's agent needs the agent's `a2a.stream` in "
        "its may_send.",
        {
            200: "A JSON-RPC answer (`result` or `error`: -32700, -32600, -32601, -32602, "
            "-32001 task not found, -32002 not cancelable, -32005 file parts), or for "
            "`message/stream` a text/event-stream of answers.",
            404: "No such agent, or it has no `a2a:`.",
            413: "The body is larger than gateway.max_body.",
            **_REFUSED,
        },
        params=(Param("agent", "path", "An agent declared with `a2a:`.", required=True),),
        body="A JSON-RPC 2.0 request of the A2A protocol.",
    ),
    Route(
        "POST",
        "/v1/agents/{agent}/inbox/ack",
        "inbox_ack",
        "Acknowledge or fail messages a long poll returned.",
        {
            200: "`{acked: [...], failed: [...], unknown: [...]}`",
            400: "Not a JSON object with `ack` (IDs) or `fail` and `error`.",
            **_REFUSED,
        },
        params=(_AGENT,),
        body='`{"ack": ["1-0", ...]}` and/or `{"fail": "1-0", "error": "why"}`.',
    ),
)
