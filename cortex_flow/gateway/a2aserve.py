"""The A2A protocol's server side: an agent declared with ``a2a:`` is an A2A agent.

``GET /a2a/<agent>/.well-known/agent-card.json`` is its card; ``POST /a2a/<agent>`` takes
JSON-RPC 2.0: ``message/send`` (the message becomes a request on ``a2a.stream``; the task
ID is its entry ID; the answer is the Task once it ended, or as it stands when
``configuration.blocking`` is false or the wait passed), ``message/stream`` (the Task,
then its status and artifact updates as server-sent events), ``tasks/get`` and
``tasks/cancel``. Who may call: any agent whose ``may_send`` has the stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

from aiohttp import web

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.loader import Project
from cortex_flow.flow.models import AgentSpec
from cortex_flow.gateway.a2ashapes import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    TASK_NOT_CANCELABLE,
    TASK_NOT_FOUND,
    RpcError,
    error_answer,
    flow_message,
    result_answer,
    status,
)
from cortex_flow.gateway.a2atasks import TaskRecord, TaskRecords, follow
from cortex_flow.gateway.requests import Asker
from cortex_flow.ops.tasks import NoSuchTask
from cortex_flow.runtime.adminguard import refuse

__all__ = ["STATES", "A2AServer", "declared"]

ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")
# a task's state in the flows -> its A2A state
STATES = {
    "submitted": "submitted",
    "working": "working",
    "completed": "completed",
    "failed": "failed",
    "expired": "failed",
    "canceled": "canceled",
}
SEND_WAIT = 30.0  # how long message/send waits for the end at most (and max_request_timeout)


class A2AServer:
    """JSON-RPC for the A2A agents of one gateway; ``asker`` gives the current requester."""

    def __init__(self, records: TaskRecords) -> None:
        self.records = records

    async def call(
        self, request: web.Request, name: str, spec: AgentSpec, asker: Asker, longest: float
    ) -> web.StreamResponse:
        rpc_id: Any = None
        try:
            try:
                doc = json.loads(await request.read())
            except ValueError as exc:
                raise RpcError(PARSE_ERROR, f"the body is not valid JSON: {exc}") from None
            if not isinstance(doc, dict):
                raise RpcError(INVALID_REQUEST, "the body must be one JSON-RPC request object")
            rpc_id = doc.get("id")
            method, params = doc.get("method"), doc.get("params", {})
            if doc.get("jsonrpc") != "2.0" or not isinstance(method, str):
                raise RpcError(INVALID_REQUEST, 'give "jsonrpc": "2.0", "method" and "id"')
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "params must be an object")
            if method == "message/stream":
                return await self._stream(request, rpc_id, spec, asker, params, longest)
            result = await self._method(method, spec, asker, params, longest)
        except RpcError as exc:
            return web.json_response(error_answer(rpc_id, exc.code, exc.message))
        return web.json_response(result_answer(rpc_id, result))

    async def _method(
        self, method: str, spec: AgentSpec, asker: Asker, params: dict[str, Any], longest: float
    ) -> Any:
        if method == "message/send":
            record = await self._begin(spec, asker, params, longest)
            config = params.get("configuration") or {}
            if config.get("blocking", True) is not False:
                await _ended(record, min(SEND_WAIT, longest))
            return record.task()
        if method == "tasks/get":
            return await self._get(spec, asker, _task_id(params))
        if method == "tasks/cancel":
            return await self._cancel(spec, asker, _task_id(params))
        raise RpcError(
            METHOD_NOT_FOUND,
            f"no method {method!r}; this agent answers message/send, message/stream, "
            "tasks/get and tasks/cancel",
        )

    async def _begin(
        self, spec: AgentSpec, asker: Asker, params: dict[str, Any], longest: float
    ) -> TaskRecord:
        a2a = spec.a2a
        assert a2a is not None
        message = params.get("message")
        msg = flow_message(message)
        assert isinstance(message, dict)
        if message.get("taskId"):
            raise RpcError(
                INVALID_PARAMS, "a task here takes one message; send a new one without taskId"
            )
        context = str(message.get("contextId") or uuid.uuid4().hex)
        try:
            entry_id, queue, done = await asker.begin(a2a.stream, msg, _vars(spec))
        except CortexFlowError as exc:  # the message names no key, no group answers, ...
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        record = TaskRecord(entry_id, context, message)
        follower = asyncio.ensure_future(follow(record, queue, longest, done))
        self.records.add(record, follower)
        return record

    async def _stream(
        self,
        request: web.Request,
        rpc_id: Any,
        spec: AgentSpec,
        asker: Asker,
        params: dict[str, Any],
        longest: float,
    ) -> web.StreamResponse:
        record = await self._begin(spec, asker, params, longest)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        first = {**record.task(), "status": status("submitted")}
        await _event(response, result_answer(rpc_id, first))
        async for event in record.updates():
            await _event(response, result_answer(rpc_id, event))
        await response.write_eof()
        return response

    async def _get(self, spec: AgentSpec, asker: Asker, task_id: str) -> dict[str, Any]:
        record = self.records.get(task_id)
        if record is not None:
            return record.task()
        try:
            found = await asker.task(task_id, **_where(spec))
        except NoSuchTask as exc:
            raise RpcError(TASK_NOT_FOUND, str(exc)) from None
        state = status(STATES.get(found.state, "unknown"))
        if found.error:
            state["message"] = {
                "kind": "message",
                "messageId": uuid.uuid4().hex,
                "role": "agent",
                "parts": [{"kind": "text", "text": found.error}],
                "taskId": task_id,
            }
        return {"kind": "task", "id": task_id, "contextId": task_id, "status": state}

    async def _cancel(self, spec: AgentSpec, asker: Asker, task_id: str) -> dict[str, Any]:
        try:
            canceled = await asker.cancel(task_id, **_where(spec))
        except NoSuchTask as exc:
            raise RpcError(TASK_NOT_FOUND, str(exc)) from None
        if not canceled:
            task = await self._get(spec, asker, task_id)
            raise RpcError(
                TASK_NOT_CANCELABLE,
                f"task {task_id} is already {task['status']['state']}; nothing changed",
            )
        record = self.records.get(task_id)
        if record is not None:
            await _ended(record, 5.0)  # its follower hears the cancel
            return record.task()
        return await self._get(spec, asker, task_id)


def declared(request: web.Request, project: Project) -> AgentSpec | web.Response:
    """The agent the path names, if it is an A2A agent; else a 404 saying which are."""
    name = request.match_info["agent"]
    spec = project.topology.agents.get(name)
    if spec is None or spec.a2a is None:
        with_a2a = sorted(n for n, a in project.topology.agents.items() if a.a2a)
        return refuse(
            404,
            f"no A2A agent {name}",
            "declare it with a2a: {description, skills, stream} in the flows (A2A agents: "
            f"{', '.join(with_a2a) or 'none'})",
            request,
        )
    return spec


def _vars(spec: AgentSpec) -> dict[str, str]:
    a2a = spec.a2a
    return {"priority": a2a.priority} if a2a is not None and a2a.priority else {}


def _where(spec: AgentSpec) -> dict[str, str]:
    """``stream=`` and its vars: where the agent's tasks begin."""
    assert spec.a2a is not None
    return {"stream": spec.a2a.stream, **_vars(spec)}


def _task_id(params: dict[str, Any]) -> str:
    task_id = params.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise RpcError(INVALID_PARAMS, 'params must be {"id": "<task id>"}')
    if not ENTRY_ID.fullmatch(task_id):
        raise RpcError(TASK_NOT_FOUND, f"no task {task_id!r}: task IDs are entry IDs (1-0)")
    return task_id


async def _ended(record: TaskRecord, wait: float) -> None:
    """Wait until the task ended, at most ``wait`` seconds (then it is answered as it is)."""
    try:
        async with asyncio.timeout(wait):
            async for _ in record.updates():
                pass
    except TimeoutError:
        pass


async def _event(response: web.StreamResponse, answer: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(answer).encode() + b"\n\n")
