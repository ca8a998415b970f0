"""The gateway's OpenAPI 3.1 document, generated from :data:`~.routes.ROUTES`.

``cortex-flow schema`` writes it to ``schemas/gateway.openapi.json`` and ``--check``
fails when it is stale, like the JSON Schemas of the files."""

from __future__ import annotations

import json
from typing import Any

from cortex_flow.gateway.routes import ROUTES, Route

__all__ = ["FILE_NAME", "document", "render"]

FILE_NAME = "gateway.openapi.json"

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong."},
        "fix": {"type": "string", "description": "What to change."},
        "about": {"type": "string", "description": "stream, priority, agent or var."},
        "choices": {"type": "array", "items": {"type": "string"}},
        "path": {"type": "string"},
    },
}


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.handler, "summary": route.summary}
    if route.params:
        op["parameters"] = [
            {
                "name": p.name,
                "in": p.where,
                "description": p.description,
                "required": p.required or p.where == "path",
                "schema": p.schema,
            }
            for p in route.params
        ]
    if route.body is not None:
        op["requestBody"] = {
            "description": route.body,
            "required": route.handler in ("publish", "inbox_ack"),
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    responses: dict[str, Any] = {}
    for status, text in sorted(route.responses.items()):
        answer: dict[str, Any] = {"description": text}
        if status >= 400:
            answer["content"] = {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
            }
        elif status != 101:
            answer["content"] = {"application/json": {"schema": {"type": "object"}}}
        responses[str(status)] = answer
    op["responses"] = responses
    if not route.auth:
        op["security"] = []
    return op


def document() -> dict[str, Any]:
    """The OpenAPI document of every route."""
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cortex-flow gateway",
            "version": "v1",
            "description": "HTTP and WebSocket access to the flows for agents that do not "
            "speak Redis. Every endpoint but / and /openapi.json takes the agent's token "
            "(agents.<name>.token) as `Authorization: Bearer <token>`.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {"agentToken": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"agentToken": []}],
    }


def render() -> str:
    """The document as written to ``schemas/gateway.openapi.json``."""
    return json.dumps(document(), indent=2) + "\n"
