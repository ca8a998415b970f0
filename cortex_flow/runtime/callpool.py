"""The thread pool sync ``call`` routes run in, sized from the topology.

A call's timeout runs from the moment it is submitted, so a call queued behind busy
threads spends its timeout waiting for one. The pool therefore has a thread for every
handler that may be in a sync call at once: the ``concurrency`` of each group with a
sync, non-inline ``call`` route, summed (at least ``MIN_THREADS``). Threads start
only when needed. The pool only grows: a reload that needs more threads swaps in a
larger pool; what runs or waits in the old one finishes there, then its threads exit.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from cortex_flow.flow.topology import Resolved
from cortex_flow.runtime.routes import RouteTable

MIN_THREADS = 8
THREAD_PREFIX = "cortex-call"  # the name of every thread a sync `call` runs in

T = TypeVar("T")


def threads_needed(resolved: Resolved, tables: Mapping[str, RouteTable]) -> int:
    """Threads for every handler that may be in a sync call at once, at least MIN_THREADS."""
    wanted = sum(
        resolved.groups[name].spec.concurrency
        for name, table in tables.items()
        if any(r.action == "call" and not r.inline and not r.is_async for r in table.routes)
    )
    return max(MIN_THREADS, wanted)


class CallPool(Executor):
    """A thread pool that can grow while in use; consumers keep the same object."""

    def __init__(self, threads: int = MIN_THREADS) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=THREAD_PREFIX)
        self._lock = threading.Lock()
        self._completed: list[tuple[asyncio.Future[Any], Future[Any]]] = []
        self._delivering = False  # a delivery to the loop is scheduled

    def grow(self, threads: int) -> bool:
        """Have at least ``threads`` threads from now on; True if the pool was replaced."""
        if threads <= self.threads:
            return False
        old = self._pool
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=THREAD_PREFIX)
        self.threads = threads
        old.shutdown(wait=False)  # calls running or queued there still finish
        return True

    def call(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[[Any], Any], msg: Any
    ) -> tuple[asyncio.Future[Any], Future[Any]]:
        """Run ``fn(msg)`` in a thread: a future of the loop to await, and the thread's.

        Completions reach the loop in runs: a thread that finishes while an earlier
        completion has not been delivered yet adds to that delivery instead of waking
        the loop once more (one wake-up per message cost the sync path a sixth of its
        time).
        """
        waiter: asyncio.Future[Any] = loop.create_future()
        running = self._pool.submit(fn, msg)
        running.add_done_callback(lambda done: self._finished(loop, waiter, done))
        return waiter, running

    def _finished(
        self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[Any], done: Future[Any]
    ) -> None:
        with self._lock:
            self._completed.append((waiter, done))
            if self._delivering:
                return
            self._delivering = True
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            with self._lock:
                self._delivering = False

    def _deliver(self) -> None:
        with self._lock:
            completed, self._completed = self._completed, []
            self._delivering = False
        for waiter, done in completed:
            if waiter.done():  # its await was cancelled (a timeout, a stop)
                continue
            if done.cancelled():
                waiter.cancel()
            elif (exc := done.exception()) is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(done.result())

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
