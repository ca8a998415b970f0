"""Task states: what became of a requested (or tracked) message, as stored in Redis.

A task's hash (:func:`~cortex_flow.wire.replies.task_key`) is written by the runner in
the commit that settles the message (``completed``, ``failed``, ``expired``, ``canceled``)
and by a cancel; ``submitted`` and ``working`` are not written (that would cost a round
trip per message): they are read off the stream and its groups' pending lists. Fields:
``state``, ``stream``, ``id``, ``attempts``, ``error``, ``reply`` (the reply stream),
``corr``, ``updated`` (Unix ms) and ``cancel`` (``1`` once a cancel was asked for).
Every hash expires ``keep`` after its last write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUBMITTED, WORKING, COMPLETED, FAILED = "submitted", "working", "completed", "failed"
CANCELED, EXPIRED = "canceled", "expired"
STATES = (SUBMITTED, WORKING, COMPLETED, FAILED, CANCELED, EXPIRED)
FINAL = frozenset({COMPLETED, FAILED, CANCELED, EXPIRED})

# KEYS[1] the task hash; ARGV: keep (ms), now (ms), stream, id, corr, reply.
# A settled task is left as it is: its state is returned. Else it becomes canceled.
CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'canceled' then return state end
if state == 'canceled' then return 'already' end
redis.call('HSET', KEYS[1], 'state', 'canceled', 'cancel', '1', 'updated', ARGV[2],
  'stream', ARGV[3], 'id', ARGV[4], 'corr', ARGV[5], 'reply', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 'ok'
"""


@dataclass(frozen=True)
class TaskState:
    """A task as :meth:`cortex_flow.Client.task` and ``cortex-flow task`` show it."""

    stream: str  # the Redis key of the entry that began it
    id: str
    state: str
    attempts: int = 0
    error: str | None = None
    reply: str | None = None  # the reply stream, where the result went
    corr: str | None = None
    updated: int | None = None  # Unix ms of the last write

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "id": self.id,
            "state": self.state,
            "attempts": self.attempts,
            "error": self.error,
            "reply": self.reply,
            "corr": self.corr,
            "updated": self.updated,
        }


def state_fields(
    state: str,
    *,
    stream: str,
    entry_id: str,
    attempts: int,
    updated: int,
    error: str = "",
    reply: str = "",
    corr: str = "",
) -> dict[str, str]:
    """The fields a settled task's hash is set to."""
    return {
        "state": state,
        "stream": stream,
        "id": entry_id,
        "attempts": str(attempts),
        "error": error,
        "reply": reply,
        "corr": corr,
        "updated": str(updated),
    }


def from_hash(stream: str, entry_id: str, data: dict[str, str]) -> TaskState:
    """A stored task hash as a :class:`TaskState`."""
    return TaskState(
        stream=data.get("stream") or stream,
        id=data.get("id") or entry_id,
        state=data.get("state", SUBMITTED),
        attempts=int(data.get("attempts") or 0),
        error=data.get("error") or None,
        reply=data.get("reply") or None,
        corr=data.get("corr") or None,
        updated=int(data["updated"]) if data.get("updated") else None,
    )
