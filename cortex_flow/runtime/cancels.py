"""Hearing cancels: a group's watch on the project's cancel channel.

``Client.cancel`` (and ``cortex-flow cancel``) marks the task canceled in its hash and
announces ``<stream key> <entry id>`` on the channel. A runner that hears it skips the
entry if it has not started it and cancels its async handler if it runs. Cancels are
also kept in a sorted set (``<prefix>cancels``, by time) that a watch reads once it
listens, so a runner started later knows them too. One that missed it anyway (its
connection dropped) still honours the cancel: the commit script reads the task's mark
and discards the result (:mod:`runtime.replies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from cortex_flow.runtime.delivery import TRANSIENT
from cortex_flow.runtime.replies import CANCELS_KEPT, Conversations
from cortex_flow.wire.connection import Backoff
from cortex_flow.wire.replies import cancel_channel, now_ms, recent_cancels

# one listener per connection pool and namespace, shared by the groups of a runner
_LISTENERS: dict[tuple[int, str], _Listener] = {}


class CancelWatch:
    """One group consumer's part in the runner's cancel listener: the cancels heard feed
    its Conversations. The listener (one pub/sub connection and one task) is shared by
    every consumer of the same Redis client and namespace, so a runner of a thousand
    groups holds one subscription, not a thousand."""

    def __init__(self, client: Any, conv: Conversations, log: logging.Logger) -> None:
        self.client = client
        self.conv = conv
        self.log = log
        self._listener: _Listener | None = None

    @property
    def subscribed(self) -> asyncio.Event:
        listener = self._listener
        return listener.subscribed if listener is not None else asyncio.Event()

    def start(self) -> None:
        """Join the runner's listener (started with its first consumer), once."""
        if self._listener is not None:
            return
        key = (id(self.client), self.conv.prefix)
        listener = _LISTENERS.get(key)
        if listener is None:
            listener = _LISTENERS[key] = _Listener(self.client, self.conv.prefix, self.log)
        self._listener = listener
        listener.join(self.conv)

    async def ready(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until listening and past cancels are known."""
        if self._listener is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listener.subscribed.wait(), timeout)

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and await listener.leave(self.conv):
            key = (id(self.client), self.conv.prefix)
            if _LISTENERS.get(key) is listener:
                del _LISTENERS[key]


class _Listener:
    """The subscription to a namespace's cancel channel, fanned out to the groups."""

    def __init__(self, client: Any, prefix: str, log: logging.Logger) -> None:
        self.client = client
        self.prefix = prefix
        self.log = log
        self.convs: list[Conversations] = []
        self.heard: dict[tuple[str, str], None] = {}  # replayed to a group that joins late
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def join(self, conv: Conversations) -> None:
        self.convs.append(conv)
        for key, entry_id in self.heard:
            conv.cancel(key, entry_id)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._listen(), name=f"cancels:{self.prefix}"
            )

    async def leave(self, conv: Conversations) -> bool:
        """``conv`` no longer listens; True when it was the last (the listener stopped)."""
        with contextlib.suppress(ValueError):
            self.convs.remove(conv)
        if self.convs:
            return False
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        return True

    def _heard(self, text: str) -> None:
        key, _, entry_id = text.rpartition(" ")
        if not key:
            return
        if len(self.heard) >= CANCELS_KEPT:
            self.heard.pop(next(iter(self.heard)))
        self.heard[(key, entry_id)] = None
        for conv in self.convs:
            conv.cancel(key, entry_id)

    async def _listen(self) -> None:
        prefix = self.prefix
        channel = cancel_channel(prefix)
        backoff = Backoff(initial=0.1, maximum=5.0)
        while not self._closed:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                # what was canceled before we listened: from the recent cancels' set
                keep = max((conv.keep_ms for conv in self.convs), default=0)
                for member in await self.client.zrangebyscore(
                    recent_cancels(prefix), now_ms() - keep, "+inf"
                ):
                    self._heard(member.decode() if isinstance(member, bytes) else str(member))
                self.subscribed.set()
                backoff.reset()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message["data"]
                    self._heard(data.decode() if isinstance(data, bytes) else str(data))
            except TRANSIENT as exc:
                self.subscribed.clear()
                if self._closed:  # redis-py may turn our cancel into a connection error
                    return
                delay = backoff.next_delay()
                self.log.warning(
                    "listening for cancels failed (%s); again in %.1fs (a cancel meanwhile "
                    "still discards the result at commit)",
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
