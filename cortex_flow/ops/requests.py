"""Asking and waiting: publishing requests and reading their replies, as a requester.

A requester (one :class:`~cortex_flow.client.Client`, or one ``cortex-flow send --wait``)
has a reply stream of its own, ``<prefix>replies:<random id>``: made when it first asks,
kept alive (PEXPIRE) while it waits for replies, left to expire ``idle`` after its last
use. Replies are written with XADD NOMKSTREAM, so a reply to a requester long gone does
not bring its stream back, and trimmed to about :data:`~cortex_flow.wire.replies.REPLY_MAXLEN`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from cortex_flow.errors import CortexFlowError, RequestCanceled, RequestFailed, RequestTimeout
from cortex_flow.flow.durations import parse_duration
from cortex_flow.flow.loader import Project
from cortex_flow.flow.topology import namespace, resolve
from cortex_flow.wire import replies as wire
from cortex_flow.wire.codec import encode
from cortex_flow.wire.replies import Reply, now_ms

log = logging.getLogger("cortex_flow.requests")

# a reply stream with nobody waiting on it expires after this long
REPLY_IDLE = 300.0


def seconds(value: Any, what: str) -> float:
    """``value`` (seconds, or a duration such as ``"30s"``) as a positive number of
    seconds; a clear error for anything else."""
    try:
        if isinstance(value, str):  # "30s", or a bare number of seconds
            bare = value.strip().replace(".", "", 1)
            number = float(value) if bare.isdigit() else parse_duration(value)
        else:
            number = float(value)
    except (TypeError, ValueError) as exc:
        raise CortexFlowError(
            f"{what} must be a duration such as 30s or 1.5, got {value!r}: {exc}"
        ) from None
    if not math.isfinite(number) or number <= 0:
        raise CortexFlowError(f"{what} must be more than 0 seconds, got {value!r}")
    return number


def project_prefix(project: Project) -> str:
    """Where the project's reply streams, task states and cancel channel live."""
    return namespace(project.topology)


def request_fields(
    codec: str,
    msg: Mapping[str, Any],
    *,
    corr: str | None = None,
    reply: str | None = None,
    ttl: float | None = None,
) -> dict[str, str]:
    """A message's fields with the request's: correlation id, reply stream, deadline."""
    fields = encode(codec, msg)
    clash = sorted(f for f in wire.FIELDS if f in fields)
    if clash:
        raise CortexFlowError(f"message field {clash[0]} is reserved for requests; rename it")
    if corr is not None and reply is not None:
        fields[wire.CORR] = corr
        fields[wire.REPLY] = reply
    if ttl is not None:
        fields[wire.DEADLINE] = str(now_ms() + int(ttl * 1000))
    return fields


class Answered:
    """Which keys a declared group reads, worked out once per project."""

    def __init__(self, project: Project) -> None:
        resolved = resolve(project.topology, "client")
        self.keys = frozenset(k.key for g in resolved.groups.values() for k in g.keys)
        self.streams = sorted({g.stream for g in resolved.groups.values()})

    def check(self, key: str, stream: str) -> None:
        """Refuse a request to a key no declared group reads: nobody would answer."""
        if key not in self.keys:
            raise CortexFlowError(
                f"no group reads {key} (stream {stream}), so nobody would answer this "
                f"request; streams a group reads: {', '.join(self.streams) or 'none'}"
            )


class ReplyInbox:
    """One requester's reply stream and the requests waiting on it."""

    def __init__(self, redis: Any, prefix: str, *, idle: float = REPLY_IDLE) -> None:
        self.redis = redis
        self.key = wire.reply_key(prefix, uuid.uuid4().hex)
        self.idle_ms = int(idle * 1000)
        # correlation id -> every reply (a stream) or the ending one (a request)
        self._waiting: dict[str, asyncio.Queue[Reply] | asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._last = "0-0"
        self._fresh_until = 0.0  # monotonic: the stream surely exists until then
        self._closed = False

    async def _keep(self) -> None:
        """Make the stream exist (or again) and push its expiry out."""
        now = time.monotonic()
        if now < self._fresh_until:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.key, {"kind": "open"}, maxlen=wire.REPLY_MAXLEN, approximate=True)
        pipe.pexpire(self.key, self.idle_ms)
        entry_id, _ = await pipe.execute()
        if self._last == "0-0":
            self._last = entry_id
        self._fresh_until = now + self.idle_ms / 3000

    def register(self, corr: str) -> asyncio.Queue[Reply]:
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._waiting[corr] = queue
        return queue

    def expect(self, corr: str) -> asyncio.Future[Reply]:
        """A future for the reply that ends request ``corr`` (its parts are ignored)."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[corr] = future
        return future

    def forget(self, corr: str) -> None:
        self._waiting.pop(corr, None)

    async def ready(self) -> None:
        """The stream exists and its reader runs."""
        await self._keep()
        self._closed = False
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(
                self._read(), name=f"replies:{self.key}"
            )

    async def _read(self) -> None:
        while not self._closed:
            try:
                reply = await self.redis.xread({self.key: self._last}, count=500, block=1000)
            except Exception as exc:  # lost connection, refusal: logged, tried again
                if self._closed:  # redis-py may turn our cancel into a connection error
                    return
                log.warning("reading replies from %s failed (%s); trying again", self.key, exc)
                await asyncio.sleep(0.5)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self._last = entry_id
                    parsed = wire.parse_reply(fields)
                    if parsed is None:
                        continue
                    waiting = self._waiting.get(parsed.corr)
                    if isinstance(waiting, asyncio.Queue):
                        waiting.put_nowait(parsed)
                    elif waiting is not None and parsed.ends and not waiting.done():
                        waiting.set_result(parsed)
            if self._waiting:
                await self._keep()

    async def close(self) -> None:
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


def raise_for(reply: Reply) -> None:
    """Raise what an ending reply other than ``final`` means."""
    where = f"{reply.id} on {reply.stream}"
    if reply.kind == wire.CANCELED:
        raise RequestCanceled(f"request {where} was canceled")
    if reply.kind in (wire.FAILED, wire.EXPIRED):
        reason = reply.error or reply.kind
        raise RequestFailed(
            f"request {where} failed: {reason}", reason=reason, stream=reply.stream, id=reply.id
        )


async def replies(queue: asyncio.Queue[Reply], timeout: float, what: str) -> AsyncIterator[Reply]:
    """The replies to one request until its end; RequestTimeout once ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            async with asyncio.timeout(left):
                reply = await queue.get()
        except TimeoutError:
            raise RequestTimeout(f"no reply to {what} within {timeout:g}s") from None
        yield reply
        if reply.ends:
            return


def parts_in_order(reply: Reply, seen: int, attempt: int) -> tuple[bool, int, int]:
    """Whether a part is new to a reader that has ``seen`` parts of ``attempt``: a part of a
    later attempt (the handler restarted) is new only past what was seen already."""
    if reply.attempt < attempt:
        return False, seen, attempt  # a late part of an attempt given up
    if reply.seq < seen:
        return False, seen, max(attempt, reply.attempt)
    return True, reply.seq + 1, max(attempt, reply.attempt)
