"""The threads sync ``call`` routes run in: calls handed over in chunks, results in runs.

A thread pool that takes one submission per message wakes a thread per message and the
loop once more per result; for short handlers those wake-ups are most of the cost.
Here the calls a loop iteration makes are queued together and one thread is woken for
them; it runs them one after another and hands the results back in one go. Calls do
not wait behind a slow one for long: while calls have queued for more than ``AGE``
without a thread taking them, more threads are woken or started, one for each such
call, up to the pool's size. So short handlers share a thread or two, and handlers
that block (a model or API call over a sync client) each get their own.

A call's timeout runs from the moment it is queued, so a call that waits for a thread
spends its timeout waiting. The pool therefore has room for a thread for every handler
that may be in a sync call at once: the ``concurrency`` of each group with a sync,
non-inline ``call`` route, summed (at least ``MIN_THREADS``). A call stuck past its
timeout (:meth:`CallPool.stuck`) holds its thread until it returns, but that thread no
longer counts against the size: each group bounds its own stuck calls, and no group's
stuck calls take the threads of the others. Threads start only when
needed and end after ``IDLE_EXIT`` seconds without work; a reload may raise the size.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cortex_flow.flow.topology import Resolved

MIN_THREADS = 8
THREAD_PREFIX = "cortex-call"  # the name of every thread a sync `call` runs in
AGE = 0.002  # a call queued this long with no thread taking it gets a thread of its own
DELIVER_EVERY = 0.001  # a thread in a run of calls hands results back at least this often
IDLE_EXIT = 30.0  # a thread without work for this long ends

SMOOTHING = 0.1  # of the moving average of how long a call takes

_QUEUED, _RUNNING, _CANCELLED, _STUCK, _RETURNED = 0, 1, 2, 3, 4


class _Table(Protocol):
    threaded: bool  # has a sync call that runs in a thread


def threads_needed(resolved: Resolved, tables: Mapping[str, _Table]) -> int:
    """Threads for every handler that may be in a sync call at once, at least MIN_THREADS."""
    wanted = sum(
        resolved.groups[name].spec.concurrency for name, table in tables.items() if table.threaded
    )
    return max(MIN_THREADS, wanted)


class Call:
    """One sync call: queued, running in a thread, then finished (on the loop's side)."""

    __slots__ = (
        "after",
        "error",
        "finished",
        "fn",
        "loop",
        "msg",
        "notify",
        "queued",
        "state",
        "tag",
        "value",
        "waiter",
    )  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[[Any], Any],
        msg: Any,
        notify: Callable[[Call], None] | None = None,
    ) -> None:
        self.fn = fn
        self.msg = msg
        self.loop = loop
        # told on the loop once the thread returned: ``notify(call)`` if given (no
        # future per call), else the result or error is set on ``waiter``
        self.notify = notify
        self.waiter: asyncio.Future[Any] | None = None if notify else loop.create_future()
        self.tag: Any = None  # the caller's
        self.queued = time.monotonic()
        self.state = _QUEUED
        self.value: Any = None
        self.error: BaseException | None = None
        self.finished = False  # its thread returned and the loop was told (loop side)
        self.after: asyncio.Future[None] | None = None  # for returning(), made on demand

    @property
    def returned(self) -> bool:
        """Its thread returned (it may not have been handed back to the loop yet)."""
        return self.state == _RETURNED

    async def returning(self) -> Any:
        """Wait until its thread returns (the waiter may have been given up); its result."""
        if not self.finished:
            if self.after is None:
                self.after = self.loop.create_future()
            await self.after
        if self.error is not None:
            raise self.error
        return self.value


class CallPool:
    """Sync calls in threads of its own; consumers keep the same object across reloads."""

    def __init__(self, threads: int = MIN_THREADS) -> None:
        self.threads = threads  # at most this many threads at once
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: deque[Call] = deque()  # queued, in order (cancelled ones skipped)
        self._started = 0  # threads alive
        self._idle = 0  # of them, waiting for work
        self._took = 0.0  # how long a call takes, a moving average (seconds)
        self._returns = 0  # calls returned, ever
        self._returns_seen = 0  # as of the last age check
        self._closed = False
        self._new: list[Call] = []  # queued by the loop this iteration (loop side)
        self._flushing = False  # a hand-over to the threads is scheduled (loop side)
        self._checking = False  # an age check is scheduled (loop side)
        self._finished: list[Call] = []  # returned, not yet delivered to the loop
        self._oldest = 0.0  # when the first of them returned
        self._delivering = False  # a delivery to the loop is scheduled
        # running past their timeout (:meth:`stuck`): their threads do not count against
        # ``threads``, so stuck calls never take the threads other groups' calls need
        self._stuck = 0

    def grow(self, threads: int) -> bool:
        """Allow at least ``threads`` threads from now on; True if that raised the size."""
        with self._lock:
            if threads <= self.threads:
                return False
            self.threads = threads
            return True

    @property
    def started(self) -> int:
        """Threads alive now."""
        return self._started

    def call(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[[Any], Any],
        msg: Any,
        notify: Callable[[Call], None] | None = None,
    ) -> Call:
        """Queue ``fn(msg)`` for a thread; await ``.waiter`` for its result (or be notified)."""
        call = Call(loop, fn, msg, notify)
        self._new.append(call)
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush, loop)
        return call

    def stuck(self, call: Call) -> None:
        """``call`` runs past its timeout: from now until it returns, its thread is not
        counted against the pool's size (its caller bounds how many it lets stick)."""
        with self._lock:
            if call.state == _RUNNING:
                call.state = _STUCK
                self._stuck += 1

    def cancel(self, call: Call) -> bool:
        """Take back a call no thread has started; False if it runs or ran."""
        with self._lock:
            if call.state != _QUEUED:
                return False
            call.state = _CANCELLED
            return True

    # -- the loop's side ---------------------------------------------------------------

    def flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the calls queued so far to the threads now, not at the loop's next pass."""
        if self._new:
            self._flush(loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flushing = False  # a pass scheduled meanwhile finds nothing new: a no-op
        new, self._new = self._new, []
        if not new:
            return
        with self._lock:
            self._queue.extend(new)
            self._wake(self._wanted())
        if not self._checking:
            self._checking = True
            loop.call_later(AGE, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        """Calls queued ``AGE`` while every thread is in a longer call: a thread each."""
        self._checking = False
        old = time.monotonic() - AGE
        with self._lock:
            aged = 0
            progressed = self._returns != self._returns_seen
            self._returns_seen = self._returns
            if not progressed:  # else the threads are getting through the queue
                for call in self._queue:
                    if call.queued > old:
                        break
                    if call.state == _QUEUED:
                        aged += 1
            if aged:
                self._wake(aged)
            waiting = bool(self._queue)
            stale = bool(self._finished) and not self._delivering
        if stale:  # results a thread left behind before it went into a long call
            self._deliver()
        if waiting or stale:
            self._checking = True
            loop.call_later(AGE, self._check, loop)

    def _wanted(self) -> int:
        """More threads the queue wants now, from how long calls take (lock held).

        Calls that take longer than ``AGE`` want a thread each; shorter ones as many
        threads as get through the queue in about ``AGE``, counting those at work.
        """
        queued = len(self._queue)
        if self._took >= AGE:
            return queued
        working = self._started - self._idle
        return max(0, min(queued, math.ceil(queued * self._took / AGE) or 1) - working)

    def _wake(self, wanted: int) -> None:
        """Up to ``wanted`` more threads at the queue: idle ones first (lock held)."""
        if not self._queue or self._closed:
            return
        woken = min(wanted, self._idle)
        if woken:
            self._work.notify(woken)
        for _ in range(min(wanted - woken, self.threads + self._stuck - self._started)):
            self._started += 1
            thread = threading.Thread(
                target=self._drain, name=f"{THREAD_PREFIX}-{self._started}", daemon=True
            )
            thread.start()

    def _deliver(self) -> None:
        with self._lock:
            finished = self._finished[:]
            self._finished.clear()  # the threads hold this list
            self._delivering = False
        for call in finished:
            call.finished = True
            waiter = call.waiter
            if waiter is None:
                call.notify(call)  # type: ignore[misc]
            elif not waiter.done():  # else its await was given up (a timeout, a stop)
                if call.error is not None:
                    waiter.set_exception(call.error)
                else:
                    waiter.set_result(call.value)
            after = call.after
            if after is not None and not after.done():
                after.set_result(None)

    # -- the threads' side -------------------------------------------------------------

    def _drain(self) -> None:
        lock, queue, finished = self._lock, self._queue, self._finished
        call: Call | None = None
        began = 0.0
        while True:
            with lock:
                if call is not None:  # the one that just returned
                    if call.state == _STUCK:
                        self._stuck -= 1
                    now = time.monotonic()
                    self._took += (now - began - self._took) * SMOOTHING
                    self._returns += 1
                    call.state = _RETURNED
                    if not finished:
                        self._oldest = now
                    finished.append(call)
                    if not queue or now - self._oldest >= DELIVER_EVERY:
                        self._hand_back()
                    call = None
                while call is None:
                    while queue:
                        head = queue.popleft()
                        if head.state == _QUEUED:
                            head.state = _RUNNING
                            call = head
                            break
                    if call is None and (self._closed or not self._idle_wait()):
                        self._started -= 1
                        return
            began = time.monotonic()
            try:
                call.value = call.fn(call.msg)
            except BaseException as exc:  # the caller gets it, whatever it is
                call.error = exc

    def _idle_wait(self) -> bool:
        """Wait for work (lock held); False if none came for IDLE_EXIT seconds."""
        self._idle += 1
        try:
            notified = self._work.wait(IDLE_EXIT)
        finally:
            self._idle -= 1
        return bool(self._queue) or (notified and not self._closed)

    def _hand_back(self) -> None:
        """Schedule delivering the returned calls to the loop, unless it is (lock held)."""
        finished = self._finished
        if self._delivering or not finished:
            return
        self._delivering = True
        try:
            finished[0].loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            self._delivering = False

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work; queued calls are dropped if ``cancel_futures``; threads end."""
        with self._lock:
            self._closed = True
            if cancel_futures:
                for call in self._queue:
                    if call.state == _QUEUED:
                        call.state = _CANCELLED
                        if call.waiter is not None:
                            with contextlib.suppress(RuntimeError):
                                call.loop.call_soon_threadsafe(call.waiter.cancel)
                self._queue.clear()
            self._work.notify_all()
        if wait:
            deadline = time.monotonic() + 30
            while self._started and time.monotonic() < deadline:
                time.sleep(0.005)


_fallback: list[CallPool] = []


def default_pool() -> CallPool:
    """A pool for sync calls when no executor is given (the runner always gives one)."""
    if not _fallback:
        _fallback.append(CallPool())
    return _fallback[0]
