"""Reading a request's JSON body and answering JSON, the same way on every route."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from cortex_flow.runtime.adminguard import refuse

__all__ = ["bad", "body", "json_response"]


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


def bad(request: web.Request, error: str, about: str) -> web.Response:
    return json_response({"error": error, "about": about, "path": request.path}, status=400)


async def body(request: web.Request, *, required: bool) -> dict[str, Any] | web.Response:
    """The JSON object in the body (``{}`` for none when not ``required``); a 400/415
    response when it is not one."""
    if not request.can_read_body:
        if required:
            return bad(request, 'the body must be a JSON object, e.g. {"type": "chat"}', "body")
        return {}
    if request.content_type != "application/json":
        return refuse(
            415,
            f"the body is {request.content_type}, not application/json",
            "send Content-Type: application/json",
            request,
        )
    try:
        doc = json.loads(await request.read())
    except ValueError as exc:
        return bad(request, f"the body is not valid JSON: {exc}", "body")
    if not isinstance(doc, dict):
        return bad(request, 'the body must be a JSON object, e.g. {"type": "chat"}', "body")
    return doc
