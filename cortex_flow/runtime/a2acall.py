"""The ``a2a`` route action: the message to an external A2A agent as JSON-RPC
``message/send`` (A2A protocol 0.3), its reply taken from the task's artifacts.

The message goes as one data part (its fields). The answer is the route's result (the
reply of a request, as a ``call``'s return value is): a completed Task's artifact
parts (one part: its text or data; several: a list of them), or a Message's parts.
A task that ends ``failed``, ``canceled`` or ``rejected``, one not ended when the agent
answered (``working``, ``input-required``, ...), a JSON-RPC error or an HTTP status of
300 or more raise: the message is retried, then dead-lettered, as any failed route.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = ["send_message"]

ENDED_BADLY = frozenset({"failed", "canceled", "rejected"})


async def send_message(
    http: Any, url: str, msg: Mapping[str, Any], headers: Mapping[str, str], timeout: float
) -> Any:
    """``message/send`` ``msg`` to the agent at ``url`` over ``http`` (an aiohttp session);
    the reply, or RuntimeError saying why there is none."""
    message = {
        "kind": "message",
        "messageId": uuid.uuid4().hex,
        "role": "user",
        "parts": [{"kind": "data", "data": dict(msg)}],
    }
    body = {
        "jsonrpc": "2.0",
        "id": uuid.uuid4().hex,
        "method": "message/send",
        "params": {"message": message, "configuration": {"blocking": True}},
    }
    async with asyncio.timeout(timeout):
        # redirects are not followed: where a request goes is the flow file's to say
        async with http.request(
            "POST", url, json=body, headers=dict(headers), allow_redirects=False
        ) as resp:
            text = await resp.text()
            if resp.status >= 300:
                raise RuntimeError(f"HTTP {resp.status} from A2A agent {url}: {text[:200]}")
    try:
        answer = json.loads(text)
    except ValueError:
        raise RuntimeError(f"A2A agent {url} answered no JSON-RPC: {text[:200]!r}") from None
    if not isinstance(answer, dict):
        raise RuntimeError(f"A2A agent {url} answered no JSON-RPC object: {text[:200]!r}")
    error = answer.get("error")
    if error is not None:
        code, why = (
            (error.get("code"), error.get("message")) if isinstance(error, dict) else ("?", error)
        )
        raise RuntimeError(f"A2A agent {url} refused message/send: {code} {why}")
    return _reply(url, answer.get("result"))


def _reply(url: str, result: Any) -> Any:
    if not isinstance(result, dict):
        raise RuntimeError(f"A2A agent {url} answered no Task or Message: {result!r:.200}")
    if result.get("kind") == "message":
        return _value(result.get("parts") or [])
    status = result.get("status") or {}
    state = status.get("state")
    if state != "completed":
        said = _value((status.get("message") or {}).get("parts") or [])
        why = f": {said}" if said else ""
        ended = "ended" if state in ENDED_BADLY else "had not ended, it was"
        raise RuntimeError(f"A2A task {result.get('id')} at {url} {ended} {state}{why}")
    found = [p for a in result.get("artifacts") or [] for p in a.get("parts") or []]
    return _value(found)


def _value(parts: list[Any]) -> Any:
    values = [p.get("data") if p.get("kind") == "data" else p.get("text") for p in parts]
    if not values:
        return None
    return values[0] if len(values) == 1 else values
