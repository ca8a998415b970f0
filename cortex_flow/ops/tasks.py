"""A task's state, and canceling one: ``Client.task``/``cancel`` and their commands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cortex_flow.errors import CortexFlowError
from cortex_flow.wire import replies as wire
from cortex_flow.wire import tasks
from cortex_flow.wire.replies import now_ms
from cortex_flow.wire.tasks import TaskState, from_hash

# a cancel's task state is kept this long (the runner's keep_tasks applies to the rest)
CANCEL_KEEP = 3600.0


class NoSuchTask(CortexFlowError):
    """Neither a task state nor the entry is there."""


async def _entry(redis: Any, key: str, entry_id: str) -> dict[str, str] | None:
    rows = await redis.xrange(key, entry_id, entry_id, count=1)
    return dict(rows[0][1]) if rows else None


async def _pending(redis: Any, key: str, entry_id: str) -> int:
    """How many times a group has the entry out (0: no group holds it)."""
    try:
        groups = await redis.xinfo_groups(key)
    except Exception:
        return 0
    for group in groups:
        name = group["name"]
        rows = await redis.xpending_range(key, name, entry_id, entry_id, 1)
        if rows:
            return int(rows[0]["times_delivered"])
    return 0


async def task_state(redis: Any, prefix: str, key: str, entry_id: str) -> TaskState:
    """The state of the task begun by ``entry_id`` of ``key``.

    A settled or canceled task is read from its hash; else an entry a group holds is
    ``working`` and one still in its stream ``submitted``. :class:`NoSuchTask` otherwise.
    """
    data = await redis.hgetall(wire.task_key(prefix, key, entry_id))
    if data and data.get("state"):
        return from_hash(key, entry_id, data)
    fields = await _entry(redis, key, entry_id)
    if fields is None:
        raise NoSuchTask(
            f"no task {entry_id} on {key}: no state is kept for it (its state expired, or it "
            "was neither a request nor in a group with track: true) and the entry is gone"
        )
    deliveries = await _pending(redis, key, entry_id)
    return TaskState(
        stream=key,
        id=entry_id,
        state=tasks.WORKING if deliveries else tasks.SUBMITTED,
        attempts=deliveries,
        error=(data or {}).get("error") or None,  # of a failed attempt to be retried
        reply=fields.get(wire.REPLY),
        corr=fields.get(wire.CORR),
        updated=int(data["updated"]) if data and data.get("updated") else None,
    )


@dataclass(frozen=True)
class CancelResult:
    """What a cancel did: ``canceled`` True, or the state that made it change nothing."""

    canceled: bool
    state: str


async def cancel(redis: Any, prefix: str, key: str, entry_id: str) -> CancelResult:
    """Cancel the message ``entry_id`` of ``key``: mark its task canceled, tell the
    runners, and tell its requester. One already settled is left as it is."""
    fields = await _entry(redis, key, entry_id)
    task = wire.task_key(prefix, key, entry_id)
    if fields is None and not await redis.exists(task):
        raise NoSuchTask(f"no message {entry_id} on {key} (never sent, trimmed or deleted)")
    fields = fields or {}
    reply, corr = fields.get(wire.REPLY, ""), fields.get(wire.CORR, "")
    outcome = await redis.eval(
        tasks.CANCEL, 1, task, int(CANCEL_KEEP * 1000), now_ms(), key, entry_id, corr, reply
    )
    if outcome != "ok":
        return CancelResult(False, tasks.CANCELED if outcome == "already" else str(outcome))
    member, recent = f"{key} {entry_id}", wire.recent_cancels(prefix)
    pipe = redis.pipeline(transaction=False)
    pipe.zadd(recent, {member: now_ms()})
    pipe.zremrangebyscore(recent, "-inf", now_ms() - int(CANCEL_KEEP * 1000))
    pipe.pexpire(recent, int(CANCEL_KEEP * 1000))
    pipe.publish(wire.cancel_channel(prefix), member)
    await pipe.execute()
    if reply:
        attempt = await _pending(redis, key, entry_id)
        await redis.xadd(
            reply,
            wire.reply_fields(
                corr,
                wire.CANCELED,
                stream=key,
                entry_id=entry_id,
                attempt=attempt,
                error="canceled",
            ),
            maxlen=wire.REPLY_MAXLEN,
            approximate=True,
            nomkstream=True,
        )
    return CancelResult(True, tasks.CANCELED)


# how long a task state written by an agent (Message.reply) is kept
AGENT_KEEP = 3600.0


async def answer(
    redis: Any,
    prefix: str,
    *,
    key: str,
    group: str,
    entry_id: str,
    fields: dict[str, str],
    deliveries: int,
    value: Any,
) -> None:
    """Reply to a request read from an inbox and acknowledge it, in one MULTI/EXEC.

    What a runner's commit does for a ``call``'s return value, for an agent that reads
    its inbox itself. Raises CortexFlowError when the entry is not a request.
    """
    reply = fields.get(wire.REPLY)
    if reply is None:
        raise CortexFlowError(f"{entry_id} on {key} is not a request (it has no {wire.REPLY})")
    corr = fields.get(wire.CORR, "")
    try:
        body = wire.reply_fields(
            corr, wire.FINAL, stream=key, entry_id=entry_id, attempt=deliveries, data=value
        )
    except (TypeError, ValueError) as exc:
        raise CortexFlowError(f"the reply to {entry_id} is not JSON: {exc}") from None
    task = fields.get(wire.TASK) or wire.task_key(prefix, key, entry_id)
    state = tasks.state_fields(
        tasks.COMPLETED,
        stream=key,
        entry_id=entry_id,
        attempts=deliveries,
        updated=now_ms(),
        reply=reply,
        corr=corr,
    )
    if wire.TASK in fields:
        del state["stream"], state["id"]
    pipe = redis.pipeline(transaction=True)
    pipe.xadd(reply, body, maxlen=wire.REPLY_MAXLEN, approximate=True, nomkstream=True)
    pipe.hset(task, mapping=state)
    pipe.pexpire(task, int(AGENT_KEEP * 1000))
    pipe.xack(key, group, entry_id)
    await pipe.execute()
