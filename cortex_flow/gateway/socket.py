"""The inbox over one WebSocket: credit-based flow control, settled by ID.

The client says how many messages it can hold (``{"credit": N}``, adding up); the gateway
pushes at most that many (and never more than ``gateway.max_credit`` unsettled), each as
``{"type": "message", "id", "msg", "deliveries"}``. The client answers each with
``{"ack": id}`` (or ``{"ack": [id, ...]}``, one XACK for all) or ``{"fail": id, "error":
"..."}``; the gateway confirms with ``{"type": "acked", "id"}`` (``"ids"`` for a list) /
``{"type": "failed", "id"}`` and answers a frame it cannot
use with ``{"type": "error", "error"}``. When the connection drops, what was pushed and not
acknowledged stays pending for the agent and comes again on the next connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web

from cortex_flow.gateway.inbox import InboxSession

__all__ = ["serve_socket"]

BLOCK = 1.0  # seconds one read waits, so a closed socket is noticed soon


async def serve_socket(
    ws: web.WebSocketResponse, session: InboxSession, agent: str, log: logging.Logger
) -> None:
    """Push and settle until the client goes away; the reads stop with it."""
    credit = 0
    more = asyncio.Event()
    send = asyncio.Lock()  # one frame at a time from the pump and the settling side

    async def push(frame: dict[str, Any]) -> None:
        async with send:
            await ws.send_str(json.dumps(frame))

    async def pump() -> None:
        nonlocal credit
        try:
            while not ws.closed:
                wanted = min(credit, session.room)
                if wanted <= 0:
                    more.clear()
                    await more.wait()
                    continue
                for frame in await session.take(wanted, BLOCK):
                    credit -= 1
                    await push(frame)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # Redis failed: say so and close; the client reconnects
            log.warning(
                "gateway: reading the inbox of %s failed (%s); closing its socket", agent, exc
            )
            await ws.close(code=1011, message=b"reading the inbox failed; reconnect")

    pumping = asyncio.create_task(pump())
    try:
        async for frame in ws:
            if frame.type != WSMsgType.TEXT:
                if frame.type == WSMsgType.BINARY:
                    await push({"type": "error", "error": "send JSON text frames, not binary"})
                continue
            try:
                doc = json.loads(frame.data)
            except ValueError as exc:
                await push({"type": "error", "error": f"not JSON: {exc}"})
                continue
            reply = await _settle(doc, session)
            if "credit" in reply:
                credit += reply.pop("credit")
                more.set()
            if reply:
                await push(reply)
            if reply.get("type") in ("acked", "failed"):
                more.set()
    finally:
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)


async def _settle(doc: Any, session: InboxSession) -> dict[str, Any]:
    """What one client frame asks: credit, an ack or a failure; the reply frame."""
    if not isinstance(doc, dict):
        return {"type": "error", "error": 'frames are objects: {"credit": N}, {"ack": id}, ...'}
    if "credit" in doc:
        credit = doc["credit"]
        if not isinstance(credit, int) or isinstance(credit, bool) or credit < 0:
            return {"type": "error", "error": f"credit must be a whole number >= 0, got {credit!r}"}
        return {"credit": credit}
    if "ack" in doc:
        entry_id = doc["ack"]
        if isinstance(entry_id, list):  # several at once: one XACK
            acked, unknown = await session.ack([str(i) for i in entry_id])
            reply: dict[str, Any] = {"type": "acked", "ids": acked}
            return {**reply, "unknown": unknown} if unknown else reply
        acked, _ = await session.ack([str(entry_id)])
        if acked:
            return {"type": "acked", "id": entry_id}
        return {"type": "error", "id": entry_id, "error": "not held by this connection"}
    if "fail" in doc:
        entry_id = str(doc["fail"])
        if await session.fail(entry_id, str(doc.get("error") or "failed at the agent")):
            return {"type": "failed", "id": entry_id}
        return {"type": "error", "id": entry_id, "error": "not held by this connection"}
    return {
        "type": "error",
        "error": 'unknown frame; send {"credit": N}, {"ack": id} or {"fail": id, "error": "..."}',
    }
