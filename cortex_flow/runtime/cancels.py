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
from cortex_flow.runtime.replies import Conversations
from cortex_flow.wire.connection import Backoff
from cortex_flow.wire.replies import cancel_channel, now_ms, recent_cancels


class CancelWatch:
    """Listens for one group's consumer; feeds cancels to its Conversations."""

    def __init__(self, client: Any, conv: Conversations, log: logging.Logger) -> None:
        self.client = client
        self.conv = conv
        self.log = log
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self._closed = False

    def start(self) -> None:
        """Start listening (once), when the consumer starts."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._listen(), name=f"cancels:{self.conv.name}"
            )

    async def _listen(self) -> None:
        prefix = self.conv.prefix
        channel = cancel_channel(prefix)
        backoff = Backoff(initial=0.1, maximum=5.0)
        while not self._closed:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                # what was canceled before we listened: from the recent cancels' set
                since = now_ms() - self.conv.keep_ms
                for member in await self.client.zrangebyscore(
                    recent_cancels(prefix), since, "+inf"
                ):
                    text = member.decode() if isinstance(member, bytes) else str(member)
                    key, _, entry_id = text.rpartition(" ")
                    if key:
                        self.conv.cancel(key, entry_id)
                self.subscribed.set()
                backoff.reset()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message["data"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    key, _, entry_id = text.rpartition(" ")
                    if key:
                        self.conv.cancel(key, entry_id)
            except TRANSIENT as exc:
                self.subscribed.clear()
                if self._closed:  # redis-py may turn our cancel into a connection error
                    return
                delay = backoff.next_delay()
                self.log.warning(
                    "group %s: listening for cancels failed (%s); again in %.1fs (a cancel "
                    "meanwhile still discards the result at commit)",
                    self.conv.name,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def ready(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until listening and past cancels are known."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.subscribed.wait(), timeout)

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
