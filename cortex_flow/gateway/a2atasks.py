"""The A2A tasks the gateway began: one :class:`TaskRecord` per request, fed by a follower
that reads its replies (streamed parts, then its end) and kept for ``tasks/get`` and
``message/stream`` after the HTTP call that began it returned.

The task ID is the request's entry ID. The records are bounded (:data:`KEPT`); a task no
longer kept is read from Redis (:meth:`cortex_flow.Client.task`), without its artifacts.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from cortex_flow.errors import RequestTimeout
from cortex_flow.gateway.a2ashapes import agent_message, artifact, parts, status
from cortex_flow.ops.requests import parts_in_order, replies
from cortex_flow.wire import replies as wire
from cortex_flow.wire.replies import Reply

__all__ = ["KEPT", "TaskRecord", "TaskRecords", "follow"]

KEPT = 1000
ENDED = frozenset({"completed", "failed", "canceled"})


class TaskRecord:
    """One task as A2A shows it: its status, artifacts and the events that made them."""

    def __init__(self, task_id: str, context_id: str, message: dict[str, Any]) -> None:
        self.id = task_id
        self.context_id = context_id
        self.history = [{**message, "taskId": task_id, "contextId": context_id}]
        self.status = status("submitted")
        self.artifacts: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    @property
    def ended(self) -> bool:
        return bool(self.status["state"] in ENDED)

    def task(self) -> dict[str, Any]:
        return {
            "kind": "task",
            "id": self.id,
            "contextId": self.context_id,
            "status": self.status,
            "artifacts": self.artifacts,
            "history": self.history,
        }

    async def _add(self, event: dict[str, Any]) -> None:
        async with self._changed:
            self.events.append({"taskId": self.id, "contextId": self.context_id, **event})
            self._changed.notify_all()

    async def set_state(self, state: str, text: str | None = None) -> None:
        message = agent_message(text, self.id, self.context_id) if text else None
        self.status = status(state, message)
        final = state in ENDED
        await self._add({"kind": "status-update", "status": self.status, "final": final})

    async def part(self, value: Any, first: bool) -> None:
        """A streamed part: appended to the task's ``parts`` artifact."""
        if first:
            self.artifacts.append(artifact(f"{self.id}-parts", "parts", None))
        self.artifacts[0]["parts"].extend(parts(value))
        chunk = artifact(f"{self.id}-parts", "parts", value)
        await self._add({"kind": "artifact-update", "artifact": chunk, "append": not first})

    async def reply(self, value: Any) -> None:
        if value is None:
            return
        self.artifacts.append(artifact(f"{self.id}-reply", "reply", value))
        await self._add(
            {"kind": "artifact-update", "artifact": self.artifacts[-1], "lastChunk": True}
        )

    def _past(self, seen: int) -> Callable[[], bool]:
        return lambda: len(self.events) > seen

    async def updates(self) -> AsyncIterator[dict[str, Any]]:
        """Every event from the first, waiting for more, until the final status update."""
        seen = 0
        while True:
            async with self._changed:
                await self._changed.wait_for(self._past(seen))
                new = self.events[seen:]
            seen += len(new)
            for event in new:
                yield event
                if event.get("final"):
                    return


class TaskRecords:
    """The tasks begun here, newest last; the oldest ended ones go past :data:`KEPT`."""

    def __init__(self) -> None:
        self._records: OrderedDict[str, TaskRecord] = OrderedDict()
        self._following: set[asyncio.Task[None]] = set()

    def get(self, task_id: str) -> TaskRecord | None:
        return self._records.get(task_id)

    def add(self, record: TaskRecord, follower: asyncio.Task[None]) -> None:
        self._records[record.id] = record
        self._following.add(follower)
        follower.add_done_callback(self._following.discard)
        while len(self._records) > KEPT:
            oldest = next(iter(self._records.values()))
            if not oldest.ended:
                break
            self._records.popitem(last=False)

    async def close(self) -> None:
        for follower in list(self._following):
            follower.cancel()
        await asyncio.gather(*self._following, return_exceptions=True)


async def follow(
    record: TaskRecord, queue: asyncio.Queue[Reply], timeout: float, done: Callable[[], None]
) -> None:
    """Read the request's replies into ``record`` until its end (or ``timeout``)."""
    seen, attempt = 0, 0
    try:
        await record.set_state("working")
        async for reply in replies(queue, timeout, f"task {record.id}"):
            if reply.kind == wire.PART:
                new, seen, attempt = parts_in_order(reply, seen, attempt)
                if new:
                    await record.part(reply.data, first=not record.artifacts)
            elif reply.kind == wire.FINAL:
                await record.reply(reply.data)
                await record.set_state("completed")
            elif reply.kind == wire.CANCELED:
                await record.set_state("canceled", "the task was canceled")
            else:
                await record.set_state("failed", reply.error or reply.kind)
    except RequestTimeout as exc:
        await record.set_state("failed", f"{exc}; the gateway stopped waiting")
    finally:
        done()
