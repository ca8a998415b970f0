"""An agent's inbox read by the gateway on the agent's behalf.

:class:`InboxSession` reads as consumer ``<agent>`` of the group the flows declare for its
client (:func:`~cortex_flow.ops.inbox.reading_group`), with the group's retry, claim and
dead-letter policy (:class:`~cortex_flow.ops.inbox.InboxReader`). What it hands out is
held until the client acknowledges or fails it by ID; it never holds more than
``max_held`` (the client's credit is clipped to that), so a client that never reads costs
a bounded amount of memory. What is held and never acknowledged stays in the agent's
pending list in Redis: a new session (a reconnect) reads its own pending entries first,
so a dropped connection loses nothing. An entry held longer than the group's
``claim_idle`` is forgotten here: the reader claims it again as any idle entry.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cortex_flow.flow.loader import Project
from cortex_flow.ops.inbox import InboxEntry, InboxReader, reading_group
from cortex_flow.wire.codec import DecodeError, check_text, decode

__all__ = ["InboxSession"]


class InboxSession:
    """Hands out ``agent``'s inbox entries as JSON-ready frames and settles them by ID."""

    def __init__(
        self, client: Any, project: Project, agent: str, max_held: int, log: logging.Logger
    ) -> None:
        declared = project.topology.agents[agent].inbox
        stream = declared.stream if declared is not None else "inbox"
        self.key, group = reading_group(project, agent, stream)
        self.codec = project.topology.streams[stream].codec
        self.reader = InboxReader(client, group, self.key, agent, log=log)
        self.client = client
        self.group = group.name
        self.max_held = max_held
        self._claim_idle = group.spec.retry.claim_idle
        self._held: dict[str, tuple[InboxEntry, float]] = {}

    async def start(self) -> None:
        await self.reader.start()

    @property
    def room(self) -> int:
        """How many more entries may be handed out now."""
        stale = time.monotonic() - self._claim_idle
        for entry_id in [i for i, (_, at) in self._held.items() if at < stale]:
            del self._held[entry_id]  # idle past claim_idle: the reader claims it again
        return max(0, self.max_held - len(self._held))

    async def take(self, count: int, block: float) -> list[dict[str, Any]]:
        """Up to ``count`` (clipped to :attr:`room`) entries as frames, waiting up to
        ``block`` seconds for one; entries that cannot be decoded are dead-lettered."""
        count = min(count, self.room)
        deadline = time.monotonic() + block
        frames: list[dict[str, Any]] = []
        while count > 0 and not frames:
            frames = await self._take(count, max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                break
        return frames

    async def _take(self, count: int, block: float) -> list[dict[str, Any]]:
        frames = []
        for entry in await self.reader.next(count, block):
            try:
                check_text(entry.fields)
                msg = decode(self.codec, entry.fields)
            except DecodeError as exc:  # never handed out: dead-lettered with its bytes
                await self.reader.give_up(entry, f"cannot decode: {exc}")
                continue
            self._held[entry.id] = (entry, time.monotonic())
            frames.append(
                {"type": "message", "id": entry.id, "msg": msg, "deliveries": entry.deliveries}
            )
        return frames

    async def ack(self, ids: list[str]) -> tuple[list[str], list[str]]:
        """XACK the held ``ids``: ``(acked, unknown)`` (unknown: not held by this session)."""
        known = [i for i in ids if i in self._held]
        if known:
            await self.client.xack(self.key, self.group, *known)
            for entry_id in known:
                del self._held[entry_id]
        return known, [i for i in ids if i not in self._held and i not in known]

    async def fail(self, entry_id: str, error: str) -> bool:
        """Handling failed: retried after the backoff, or dead-lettered (the group's
        policy). False when ``entry_id`` is not held by this session."""
        held = self._held.pop(entry_id, None)
        if held is None:
            return False
        await self.reader.failed(held[0], error)
        return True
