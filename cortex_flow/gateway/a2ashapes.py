"""The JSON shapes of the A2A protocol (v0.3) the gateway speaks: the agent card, messages,
parts, tasks and their stream events, and JSON-RPC 2.0 answers with A2A's error codes.

A message's text parts become the ``text`` field of the flow message and its data parts'
objects are merged into it; a reply becomes parts again: a string a text part, an object
a data part, anything else a text part of its JSON.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from cortex_flow.flow.models import AgentSpec

__all__ = [
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "PROTOCOL_VERSION",
    "TASK_NOT_CANCELABLE",
    "TASK_NOT_FOUND",
    "UNSUPPORTED_CONTENT",
    "RpcError",
    "agent_card",
    "agent_message",
    "artifact",
    "error_answer",
    "flow_message",
    "parts",
    "result_answer",
    "status",
]

PROTOCOL_VERSION = "0.3.0"
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
TASK_NOT_FOUND = -32001
TASK_NOT_CANCELABLE = -32002
UNSUPPORTED_CONTENT = -32005
MODES = ["text/plain", "application/json"]


class RpcError(Exception):
    """A JSON-RPC error to answer: ``code`` and a one-line ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def agent_card(name: str, spec: AgentSpec, url: str) -> dict[str, Any]:
    """The agent card of ``name`` served at ``url`` (its JSON-RPC endpoint)."""
    a2a = spec.a2a
    assert a2a is not None
    return {
        "protocolVersion": PROTOCOL_VERSION,
        "name": name,
        "description": a2a.description,
        "url": url,
        "preferredTransport": "JSONRPC",
        "version": a2a.version,
        "capabilities": {"streaming": True, "pushNotifications": False},
        "defaultInputModes": MODES,
        "defaultOutputModes": MODES,
        "skills": [
            {
                "id": s.id,
                "name": s.name,
                "description": s.description,
                "tags": s.tags,
                **({"examples": s.examples} if s.examples else {}),
            }
            for s in a2a.skills
        ],
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "security": [{"bearer": []}],
    }


def flow_message(message: Any) -> dict[str, Any]:
    """The flow message an A2A ``message`` becomes; RpcError when it is not one."""
    if not isinstance(message, dict) or not isinstance(message.get("parts"), list):
        raise RpcError(INVALID_PARAMS, "params.message must be a Message with a parts list")
    if not message["parts"]:
        raise RpcError(INVALID_PARAMS, "params.message.parts is empty; give a text or data part")
    texts: list[str] = []
    msg: dict[str, Any] = {}
    for i, part in enumerate(message["parts"]):
        kind = part.get("kind") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "data" and isinstance(part.get("data"), dict):
            msg.update(part["data"])
        elif kind == "file":
            raise RpcError(
                UNSUPPORTED_CONTENT, f"part {i} is a file; this agent takes text and data parts"
            )
        else:
            raise RpcError(
                INVALID_PARAMS,
                f"part {i} must be {{kind: text, text}} or {{kind: data, data: {{...}}}}",
            )
    if texts:
        msg["text"] = "\n".join(texts)
    return msg


def parts(value: Any) -> list[dict[str, Any]]:
    """The A2A parts of a reply (none for None)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"kind": "text", "text": value}]
    if isinstance(value, dict):
        return [{"kind": "data", "data": value}]
    return [{"kind": "text", "text": json.dumps(value)}]


def artifact(artifact_id: str, name: str, value: Any) -> dict[str, Any]:
    return {"artifactId": artifact_id, "name": name, "parts": parts(value)}


def agent_message(text: str, task_id: str, context_id: str) -> dict[str, Any]:
    return {
        "kind": "message",
        "messageId": uuid.uuid4().hex,
        "role": "agent",
        "parts": [{"kind": "text", "text": text}],
        "taskId": task_id,
        "contextId": context_id,
    }


def status(state: str, message: dict[str, Any] | None = None) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    found: dict[str, Any] = {"state": state, "timestamp": now}
    if message is not None:
        found["message"] = message
    return found


def result_answer(rpc_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "result": result}


def error_answer(rpc_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": code, "message": message}}
