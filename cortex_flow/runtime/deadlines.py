"""Timeouts for async calls, cheaper than one ``asyncio.timeout`` per message.

``asyncio.timeout`` schedules and cancels a timer per call, which cost the async call
path about a quarter of its throughput. Here each running call records its deadline;
one watchdog task per handler wakes every ``tick`` (a tenth of the shortest timeout,
between 5 and 100 ms) and cancels the calls past theirs, which then raise
``TimeoutError``. A call is thus cut off at its timeout plus at most one tick.
"""

from __future__ import annotations

import asyncio
import contextlib
from asyncio import current_task
from collections.abc import Awaitable, Callable
from time import monotonic  # what the event loop's time() is
from typing import Any

MIN_TICK, MAX_TICK = 0.005, 0.1


class Deadlines:
    """Runs coroutines with a timeout each; one watchdog for all of them."""

    def __init__(self) -> None:
        self._running: dict[asyncio.Task[Any], float] = {}  # task -> deadline (loop time)
        self._expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self.tick = MAX_TICK

    async def run(
        self,
        fn: Callable[[Any], Awaitable[Any]],
        msg: Any,
        timeout: float,
        task: asyncio.Task[Any] | None = None,
    ) -> None:
        """Await ``fn(msg)``; ``TimeoutError`` if it runs past ``timeout`` seconds.

        ``task``: the task awaiting this, if the caller knows it (else it is looked up)."""
        if task is None:
            task = current_task()
            assert task is not None
        self._running[task] = monotonic() + timeout  # the loop's clock
        if timeout < self.tick * 10:
            self.tick = min(MAX_TICK, max(MIN_TICK, timeout / 10))
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch(), name="call-deadlines"
            )
        try:
            await fn(msg)
        except asyncio.CancelledError:
            if self._settle(task):
                raise TimeoutError(f"timed out after {timeout:g}s") from None
            raise
        finally:
            self._running.pop(task, None)
        if self._settle(task):  # the call swallowed its cancellation: it was cut off
            raise TimeoutError(f"timed out after {timeout:g}s")

    def _settle(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` was cancelled by us; if so, that cancellation is taken back."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        task.uncancel()
        return True

    async def _watch(self) -> None:
        try:
            while self._running:
                await asyncio.sleep(self.tick)
                now = monotonic()
                for task, deadline in list(self._running.items()):
                    if deadline <= now and task not in self._expired:
                        self._expired.add(task)
                        task.cancel()
        finally:
            self._watchdog = None

    async def close(self) -> None:
        """End the watchdog (at stop)."""
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
