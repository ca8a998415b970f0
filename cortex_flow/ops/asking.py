"""Asking from Python: the request side of :class:`~cortex_flow.Client`.

``request`` waits for the reply, ``stream`` yields a streaming handler's parts,
``cancel`` and ``task`` act on a request by its entry ID. Kept apart from the client's
sending, beating and reading, which it shares ``project`` and ``redis`` with.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from cortex_flow.errors import CortexFlowError, RequestTimeout
from cortex_flow.flow.loader import Project
from cortex_flow.flow.models import StreamSpec
from cortex_flow.ops.requests import (
    Answered,
    ReplyInbox,
    parts_in_order,
    project_prefix,
    raise_for,
    replies,
    request_fields,
    seconds,
)
from cortex_flow.ops.send import target_key
from cortex_flow.ops.tasks import cancel, task_state
from cortex_flow.wire.replies import CORR, FINAL, PART, Reply
from cortex_flow.wire.tasks import TaskState

log = logging.getLogger("cortex_flow.client")

# requests published at once per client (the rest wait their turn): below the
# connection pool's 100, beside the reply reader's connection
SENDING = 64


class Asking:
    """Requests of one client: its reply stream, the requests it made, their targets."""

    project: Project
    redis: Any

    def _init_asking(self, reply_idle: float) -> None:
        self._replies: ReplyInbox | None = None  # made on the first request
        self._reply_idle = reply_idle  # the reply stream expires this long after its last use
        self._sending = asyncio.Semaphore(SENDING)
        self._answered: Answered | None = None  # the keys a group reads
        # (stream, vars...) -> key and spec of a request target, checked once
        self._targets: dict[tuple[Any, ...], tuple[str, StreamSpec]] = {}
        self._asked: dict[str, str] = {}  # entry id -> key of the requests made here

    async def _close_asking(self) -> None:
        if self._replies is not None:
            await self._replies.close()

    def _target(
        self, stream: str, vars: dict[str, str], msg: Mapping[str, Any] | None = None
    ) -> tuple[str, StreamSpec]:
        priority, agent = vars.pop("priority", None), vars.pop("agent", None)
        return target_key(self.project, stream, priority=priority, agent=agent, extra=vars, msg=msg)

    async def request(
        self,
        stream: str,
        msg: Mapping[str, Any],
        *,
        timeout: float = 30.0,
        ttl: float | str | None = None,
        **vars: str,
    ) -> Any:
        """Publish ``msg`` as a request and return the reply (what the handler returned).

        Raises :class:`~cortex_flow.RequestTimeout` when no reply came within ``timeout``
        seconds, :class:`~cortex_flow.RequestFailed` when the message was dead-lettered
        or expired, :class:`~cortex_flow.RequestCanceled` when it was canceled.
        """
        wait = seconds(timeout, "timeout")
        inbox, key, fields, spec = await self._prepare(stream, msg, ttl, vars)
        corr = fields[CORR]
        ending = inbox.expect(corr)
        try:
            entry_id = await self._send(key, fields, spec)
            try:
                async with asyncio.timeout(wait):
                    reply = await ending
            except TimeoutError:
                raise RequestTimeout(
                    f"no reply to request {entry_id} on {key} within {wait:g}s"
                ) from None
        finally:
            inbox.forget(corr)
        if reply.kind != FINAL:
            raise_for(reply)
        return reply.data

    async def stream(
        self,
        stream: str,
        msg: Mapping[str, Any],
        *,
        timeout: float = 30.0,
        ttl: float | str | None = None,
        raw: bool = False,
        **vars: str,
    ) -> AsyncIterator[Any]:
        """Publish ``msg`` as a request and yield the parts its handler (an async
        generator) yields, in order, until its end; errors as :meth:`request`.

        ``timeout`` bounds the whole exchange. A handler restarted after a crash sends
        its parts again, marked with a higher ``attempt``: the parts already yielded are
        skipped. ``raw=True`` yields every reply as a
        :class:`~cortex_flow.wire.replies.Reply` (``kind``, ``seq``, ``attempt``, ``data``)
        instead, the final one included.
        """
        seen, attempt = 0, 0
        async for reply in self._ask(stream, msg, timeout, ttl, vars):
            if raw and reply.kind in (PART, FINAL):
                yield reply
            elif reply.kind == PART:
                new, seen, attempt = parts_in_order(reply, seen, attempt)
                if new:
                    yield reply.data
            elif reply.kind != FINAL:
                raise_for(reply)

    async def _prepare(
        self, stream: str, msg: Mapping[str, Any], ttl: float | str | None, vars: dict[str, str]
    ) -> tuple[ReplyInbox, str, dict[str, str], StreamSpec]:
        """Check a request and build its fields; the reply stream made ready."""
        life = seconds(ttl, "ttl") if ttl is not None else None
        target = self._targets.get((stream, *sorted(vars.items())))
        if target is None:
            target = self._target(stream, dict(vars), msg)
            if self._answered is None:
                self._answered = Answered(self.project)
            self._answered.check(target[0], stream)
            declared = self.project.topology.streams[stream]
            # a partitioned stream's key is the message's own partition: never kept
            if len(self._targets) < 1000 and not declared.partitions:
                self._targets[(stream, *sorted(vars.items()))] = target
        key, spec = target
        if self._replies is None:
            prefix = project_prefix(self.project)
            self._replies = ReplyInbox(self.redis, prefix, idle=self._reply_idle)
        inbox = self._replies
        await inbox.ready()
        corr = uuid.uuid4().hex
        fields = request_fields(spec.codec, msg, corr=corr, reply=inbox.key, ttl=life)
        return inbox, key, fields, spec

    async def _send(self, key: str, fields: dict[str, str], spec: StreamSpec) -> str:
        # at most SENDING XADDs at once: redis-py's pool refuses a 101st connection
        async with self._sending:
            entry_id: str = await self.redis.xadd(key, fields)  # retention trims, not us
        if len(self._asked) >= 10_000:  # a bound: older ones need stream= then
            self._asked.pop(next(iter(self._asked)))
        self._asked[entry_id] = key
        return entry_id

    async def _ask(
        self,
        stream: str,
        msg: Mapping[str, Any],
        timeout: float,
        ttl: float | str | None,
        vars: dict[str, str],
    ) -> AsyncIterator[Reply]:
        """Every reply to one request (parts, then its end)."""
        wait = seconds(timeout, "timeout")
        inbox, key, fields, spec = await self._prepare(stream, msg, ttl, vars)
        corr = fields[CORR]
        queue = inbox.register(corr)
        try:
            entry_id = await self._send(key, fields, spec)
            async for reply in replies(queue, wait, f"request {entry_id} on {key}"):
                yield reply
        finally:
            inbox.forget(corr)

    def _key_of(self, entry_id: str, stream: str | None, vars: dict[str, str]) -> str:
        if stream is not None:
            return self._target(stream, vars)[0]
        key = self._asked.get(entry_id)
        if key is None:
            raise CortexFlowError(
                f"entry {entry_id} was not requested by this client; name its stream: "
                "stream=NAME (and priority=, agent= as needed)"
            )
        return key

    @property
    def reply_stream(self) -> str | None:
        """This client's reply stream (None until its first request)."""
        return self._replies.key if self._replies is not None else None

    async def cancel(self, entry_id: str, *, stream: str | None = None, **vars: str) -> bool:
        """Cancel a message: True if canceled, False if it had already ended (nothing
        changes then). ``stream`` (and its vars) name its key unless this client asked it."""
        key = self._key_of(entry_id, stream, vars)
        result = await cancel(self.redis, project_prefix(self.project), key, entry_id)
        if not result.canceled:
            log.info("%s on %s already %s; nothing changed", entry_id, key, result.state)
        return result.canceled

    async def task(self, entry_id: str, *, stream: str | None = None, **vars: str) -> TaskState:
        """The state of the task begun by ``entry_id``: submitted, working, completed,
        failed, canceled or expired, with attempts, the last error and the reply stream."""
        key = self._key_of(entry_id, stream, vars)
        return await task_state(self.redis, project_prefix(self.project), key, entry_id)
