"""``POST /v1/requests/{stream}``: publish a request and wait for its reply (request/reply
of :mod:`cortex_flow.ops.asking`), for an agent of the gateway.

One :class:`Asker` per version of the project: one reply stream for every request the
gateway relays. A reply answers 200 ``{"reply": ...}``; no reply within ``timeout`` 504;
a request dead-lettered or expired 502 (the flows behind the gateway failed it, as a
proxy's upstream would) with the dead-letter reason; a canceled one 409.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from cortex_flow.errors import CortexFlowError, RequestCanceled, RequestFailed, RequestTimeout
from cortex_flow.flow.loader import Project
from cortex_flow.gateway.bodies import bad, json_response
from cortex_flow.ops.asking import Asking
from cortex_flow.ops.requests import REPLY_IDLE, project_prefix
from cortex_flow.runtime.adminguard import refuse
from cortex_flow.wire.replies import CORR, Reply

__all__ = ["DEFAULT_TIMEOUT", "Asker", "relay", "request_vars", "timeout_of"]

DEFAULT_TIMEOUT = 30.0


class Asker(Asking):
    """The gateway's requester for one version of the project (a reload makes another)."""

    def __init__(self, project: Project, redis: Any) -> None:
        self.project = project
        self.redis = redis
        self._init_asking(REPLY_IDLE)

    async def close(self) -> None:
        await self._close_asking()

    def rebind(self, project: Project) -> bool:
        """Follow a reload of the flows: True if the reply stream stays (same namespace),
        its targets then checked again; False when a new requester is needed."""
        if project_prefix(project) != project_prefix(self.project):
            return False
        self.project = project
        self._targets.clear()
        self._answered = None
        return True

    async def begin(
        self, stream: str, msg: Mapping[str, Any], vars: Mapping[str, str]
    ) -> tuple[str, asyncio.Queue[Reply], Callable[[], None]]:
        """Publish a request: its entry ID, the queue its replies come to, and what to call
        once done with them (A2A follows a task past the call that began it)."""
        inbox, key, fields, spec = await self._prepare(stream, msg, None, dict(vars))
        corr = fields[CORR]
        queue = inbox.register(corr)
        try:
            entry_id = await self._send(key, fields, spec)
        except BaseException:
            inbox.forget(corr)
            raise
        return entry_id, queue, lambda: inbox.forget(corr)


def timeout_of(request: web.Request, most: float) -> float | web.Response:
    """The ``timeout`` query parameter in seconds (default 30, at most ``most``, which is
    ``gateway.max_request_timeout``); a 400 response when it is not one."""
    text = request.query.get("timeout")
    try:
        value = min(DEFAULT_TIMEOUT, most) if text is None else float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= most:
        return bad(
            request,
            f"timeout must be seconds above 0 and at most {most:g} "
            f"(gateway.max_request_timeout), got {text!r}",
            "timeout",
        )
    return value


def request_vars(request: web.Request) -> dict[str, str]:
    """The key variables of the query: ``priority``, ``agent`` and each ``var=NAME=VALUE``."""
    found = {k: v for k, v in request.query.items() if k in ("priority", "agent")}
    for var in request.query.getall("var", []):
        name, _, value = var.partition("=")
        found[name] = value
    return found


async def relay(
    request: web.Request, asker: Asker, msg: Mapping[str, Any], timeout: float
) -> web.Response:
    """Ask and answer: the reply, or the error as the status the module docstring names."""
    stream = request.match_info["stream"]
    try:
        reply = await asker.request(stream, msg, timeout=timeout, **request_vars(request))
    except RequestTimeout as exc:
        return refuse(
            504,
            str(exc),
            "give it longer (?timeout=SECONDS), or check the group that answers "
            f"{stream} with `cortex-flow status`",
            request,
        )
    except RequestFailed as exc:
        body = {"error": str(exc), "reason": exc.reason, "id": exc.id, "path": request.path}
        return json_response(body, status=502)
    except RequestCanceled as exc:
        return refuse(409, str(exc), "send it again if it is still wanted", request)
    except CortexFlowError as exc:  # no group answers the stream, and the like
        return bad(request, str(exc), "stream")
    return json_response({"reply": reply})
