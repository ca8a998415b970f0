"""Conversations in the runner: deadlines, replies, task states and cancels of one group.

The wire format is :mod:`cortex_flow.wire.replies`. A message is *involved* when it
carries a reply address or a deadline, or when its group has a ``ttl`` or ``track``.
Only those cost anything here. What this module decides becomes extra writes in the
entry's outcome, which :mod:`cortex_flow.runtime.commit` applies in the same script as
the XACK: the reply (XADD NOMKSTREAM to the requester's stream, so an abandoned one is
not made again), the task state (HSET + PEXPIRE), and first a guard that skips them all
when the task was canceled meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from cortex_flow.flow.declared import Topology
from cortex_flow.flow.durations import format_duration
from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.topology import ResolvedGroup, namespace
from cortex_flow.runtime.delivery import ACK, DEAD, Entry, Outcome
from cortex_flow.runtime.routes import Publish
from cortex_flow.runtime.stats import KeyStats
from cortex_flow.wire import replies as wire
from cortex_flow.wire import tasks
from cortex_flow.wire.replies import CORR, DEADLINE, REPLY, TASK, now_ms

# the fields a ``to`` route carries on to the next stream
CARRIED = (CORR, REPLY, DEADLINE)

# at most this many canceled (key, id) remembered from the channel
CANCELS_KEPT = 100_000


class Canceled(Exception):
    """The message was canceled while its handler ran."""


class Conversations:
    """What one group does for involved messages; shared by its handler and committer."""

    def __init__(
        self,
        group: ResolvedGroup,
        streams: Mapping[str, StreamSpec],
        key_stats: Mapping[str, KeyStats],
        log: logging.Logger | None = None,
    ) -> None:
        spec = group.spec
        self.name = group.name
        # the namespace, as the runners' own keys: computed from the streams alone
        self.prefix = namespace(Topology(streams=dict(streams)))
        self.ttl_ms = int(spec.ttl * 1000) if spec.ttl is not None else None
        self.track = spec.track
        self.keep_ms = max(1, int(spec.keep_tasks * 1000))
        self.max_reply = spec.max_reply_bytes
        self.has_dead_letter = group.dead_letter is not None
        # every entry is involved: look at each; else only those with the fields
        self.every = self.ttl_ms is not None or self.track
        self._key_stats = key_stats
        self.log = log or logging.getLogger("cortex_flow.consumer")
        # canceled (key, id) heard on the channel, and the tasks running involved entries
        self.canceled: dict[tuple[str, str], None] = {}
        self.running: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._cancelling: set[asyncio.Task[Any]] = set()
        self._parts: dict[tuple[str, str], int] = {}  # parts sent, until the final reply

    def involved(self, fields: Mapping[str, str]) -> bool:
        return self.every or REPLY in fields or DEADLINE in fields

    # -- before handling ---------------------------------------------------------------

    def deadline(self, entry: Entry) -> int | None:
        """The entry's deadline (Unix ms): its own, else its publish time plus the ttl."""
        own = wire.deadline_of(entry.fields)
        if own is not None or self.ttl_ms is None:
            return own
        return int(entry.id.split("-", 1)[0]) + self.ttl_ms

    def before(self, entry: Entry) -> Outcome | None:
        """The outcome of an entry expired or canceled before it ran; None: handle it."""
        deadline = self.deadline(entry)
        if deadline is not None:
            late = now_ms() - deadline
            if late > 0:
                return self.expired(
                    entry, f"its deadline passed {format_duration(late / 1000)} before it was read"
                )
        if (entry.key.key, entry.id) in self.canceled:
            return self.was_canceled(entry)
        return None

    def expired(self, entry: Entry, why: str) -> Outcome:
        """Not handled: dead-lettered as ``expired: ...``, else acknowledged and counted."""
        error = f"expired: {why}"
        self._key_stats[entry.key.key].expired += 1
        self.log.warning(
            "group %s: %s from %s %s; not handled", self.name, entry.id, entry.key.key, error
        )
        if self.has_dead_letter:
            return Outcome(entry, DEAD, [], error)
        return Outcome(entry, ACK, self.ending(entry, wire.EXPIRED, error=error))

    def was_canceled(self, entry: Entry) -> Outcome:
        """Canceled: acknowledged without its routes (the cancel wrote state and reply)."""
        self._key_stats[entry.key.key].canceled += 1
        return Outcome(entry, ACK, [])

    def retry_expires(self, entry: Entry, wait_ms: int) -> bool:
        """Whether a retry ``wait_ms`` from now would start past the entry's deadline."""
        deadline = self.deadline(entry)
        return deadline is not None and now_ms() + wait_ms >= deadline

    # -- after handling ----------------------------------------------------------------

    def task_of(self, entry: Entry) -> str | None:
        """The entry's task-state key, None when it has no task."""
        fields = entry.fields
        task = fields.get(TASK)
        if task is not None:
            return task
        if CORR in fields or self.track:
            return wire.task_key(self.prefix, entry.key.key, entry.id)
        return None

    def finish(self, outcome: Outcome, result: Any) -> Outcome:
        """Handled: carry the request on along ``to`` routes, else reply with ``result``."""
        entry = outcome.entry
        fields = entry.fields
        if outcome.publishes and REPLY in fields:
            carried = {f: fields[f] for f in CARRIED if f in fields}
            task = self.task_of(entry)
            if task is not None:
                carried[TASK] = task
            for publish in outcome.publishes:
                publish.fields.update(carried)
            if task is not None:  # working until the chain's end answers
                working = tasks.state_fields(
                    tasks.WORKING,
                    stream=entry.key.key,
                    entry_id=entry.id,
                    attempts=entry.deliveries,
                    updated=now_ms(),
                    reply=fields.get(REPLY, ""),
                    corr=fields.get(CORR, ""),
                )
                outcome.publishes[:0] = [Publish(task, {}, "c")]
                outcome.publishes.append(Publish(task, working, f"h{self.keep_ms}"))
            return outcome
        try:
            writes = self.ending(entry, wire.FINAL, data=result)
        except ValueError as exc:
            error = str(exc)
            self._key_stats[entry.key.key].failed += 1
            if self.has_dead_letter:
                return Outcome(entry, DEAD, [], error, attempt_failed=True)
            return Outcome(entry, ACK, self.ending(entry, wire.FAILED, error=error))
        outcome.publishes.extend(writes)
        return outcome

    def retry_note(self, outcome: Outcome) -> Publish | None:
        """For a failed attempt to be retried: its error in the task hash (not the state,
        which stays read off the pending list)."""
        entry = outcome.entry
        if not self.involved(entry.fields):
            return None
        task = self.task_of(entry)
        if task is None:
            return None
        note = {
            "error": outcome.error[:4000],
            "attempts": str(entry.deliveries),
            "updated": str(now_ms()),
        }
        return Publish(task, note, f"h{self.keep_ms}")

    def on_dead(self, outcome: Outcome) -> list[Publish]:
        """The reply and state that go with a dead letter (the reason tells which)."""
        entry = outcome.entry
        if not self.involved(entry.fields) and self.task_of(entry) is None:
            return []
        kind = wire.EXPIRED if outcome.error.startswith("expired") else wire.FAILED
        return self.ending(entry, kind, error=outcome.error)

    def ending(
        self, entry: Entry, kind: str, *, data: Any = None, error: str | None = None
    ) -> list[Publish]:
        """The writes that end an entry's task: guard, reply, state.

        Raises ValueError when ``data`` cannot be a reply (not JSON, or too large).
        """
        fields = entry.fields
        task = self.task_of(entry)
        writes: list[Publish] = []
        if task is not None:
            writes.append(Publish(task, {}, "c"))
        reply = fields.get(REPLY)
        corr = fields.get(CORR, "")
        if reply is not None:
            try:
                body = wire.reply_fields(
                    corr,
                    kind,
                    stream=entry.key.key,
                    entry_id=entry.id,
                    attempt=entry.deliveries,
                    seq=self._parts.pop((entry.key.key, entry.id), 0),
                    data=data,
                    error=error,
                )
            except (TypeError, ValueError) as exc:
                raise ValueError(f"the reply is not JSON: {exc}") from None
            size = len(body.get("data", ""))
            if size > self.max_reply:
                raise ValueError(
                    f"the reply is too large: {size} bytes, more than max_reply_bytes "
                    f"({self.max_reply}) of group {self.name}"
                )
            writes.append(Publish(reply, body, f"r{wire.REPLY_MAXLEN}"))
        if task is not None:
            state = {
                wire.FINAL: tasks.COMPLETED,
                wire.FAILED: tasks.FAILED,
                wire.EXPIRED: tasks.EXPIRED,
            }.get(kind, tasks.CANCELED)
            fields_ = tasks.state_fields(
                state,
                stream=entry.key.key,
                entry_id=entry.id,
                attempts=entry.deliveries,
                updated=now_ms(),
                error=error or "",
                reply=reply or "",
                corr=corr,
            )
            if TASK in fields:  # carried on: the task is the first entry's, named there
                del fields_["stream"], fields_["id"]
            writes.append(Publish(task, fields_, f"h{self.keep_ms}"))
        return writes

    # -- streaming and cancelling a running handler ----------------------------------------

    async def run_async(
        self,
        fn: Callable[[Any], Any],
        msg: Any,
        entry: Entry,
        run: Callable[[Callable[[Any], Any], Any], Any],
        client: Any,
        is_stream: bool,
    ) -> Any:
        """Run an async handler for an involved entry: cancellable, streaming its parts."""
        task = asyncio.current_task()
        assert task is not None
        held = (entry.key.key, entry.id)
        if is_stream:
            fn = self._streamer(fn, entry, client)
        self.running[held] = task
        try:
            return await run(fn, msg)
        except asyncio.CancelledError:
            if task in self._cancelling:
                self._cancelling.discard(task)
                task.uncancel()
                raise Canceled("canceled while running") from None
            raise
        finally:
            self.running.pop(held, None)
            self._cancelling.discard(task)

    def cancel(self, key: str, entry_id: str) -> None:
        """A cancel heard on the channel: remembered; a running async handler is cancelled."""
        held = (key, entry_id)
        if len(self.canceled) >= CANCELS_KEPT:
            self.canceled.pop(next(iter(self.canceled)))
        self.canceled[held] = None
        task = self.running.get(held)
        if task is not None and task not in self._cancelling:
            self._cancelling.add(task)
            task.cancel()

    def _streamer(
        self, fn: Callable[[Any], Any], entry: Entry, client: Any
    ) -> Callable[[Any], Any]:
        """``fn``, an async generator, as a coroutine sending each item as a part."""
        reply = entry.fields.get(REPLY)
        corr = entry.fields.get(CORR, "")

        async def streaming(msg: Any) -> Any:
            seq = 0
            parts: AsyncIterator[Any] = fn(msg)
            async for item in parts:
                if reply is None:
                    continue
                body = wire.reply_fields(
                    corr,
                    wire.PART,
                    stream=entry.key.key,
                    entry_id=entry.id,
                    attempt=entry.deliveries,
                    seq=seq,
                    data=item,
                )
                if len(body["data"]) > self.max_reply:
                    raise ValueError(
                        f"part {seq} of the reply is too large: {len(body['data'])} bytes, "
                        f"more than max_reply_bytes ({self.max_reply})"
                    )
                await client.xadd(
                    reply, body, maxlen=wire.REPLY_MAXLEN, approximate=True, nomkstream=True
                )
                seq += 1
            if seq:  # the final reply's place, after the parts
                if len(self._parts) >= CANCELS_KEPT:
                    self._parts.clear()
                self._parts[(entry.key.key, entry.id)] = seq
            return None

        return streaming


def apply_write(pipe: Any, publish: Publish) -> None:
    """Queue one write on a pipeline the way the commit script applies it (no guard)."""
    mode = publish.mode
    if not mode:
        pipe.xadd(publish.key, publish.fields)
    elif mode.startswith("r"):
        maxlen = int(mode[1:])
        pipe.xadd(publish.key, publish.fields, maxlen=maxlen, approximate=True, nomkstream=True)
    elif mode.startswith("h"):
        pipe.hset(publish.key, mapping=publish.fields)  # its PEXPIRE: queue_expiries
    else:  # "c": a guard needs the script; without it a cancel may come too late
        pipe.hget(publish.key, "cancel")


def queue_expiries(pipe: Any, publishes: list[Publish]) -> None:
    """Queue the PEXPIRE of each task state among ``publishes`` (after the writes, so the
    writes' results line up with them)."""
    for publish in publishes:
        if publish.mode.startswith("h"):
            pipe.pexpire(publish.key, int(publish.mode[1:]))
