"""Running a group whose routes call sync functions: many entries, one task, no future each.

A sync ``call`` always waits for a thread, so the general path (a worker task per
entry in flight, a future and a timeout per call) spends most of its time on that
bookkeeping rather than on the handlers. Here one task keeps up to ``concurrency``
entries in flight: it steps each entry's routes (:meth:`EntryHandler.steps`), queues
their sync calls in the :class:`~cortex_flow.runtime.callpool.CallPool` (the calls of
one pass reach the threads in one hand-over), and is told of the calls that returned
in runs. Deadlines wait in a queue per timeout (calls of one timeout fall due in the
order they were queued): a call still queued at its timeout is taken back and fails as
timed out; one already running cannot be stopped, so it is said to overrun (stuck): its
entry stays held and fails as timed out once it returns, but its slot goes to the next
entry, up to the group's ``max_stuck_calls`` stuck at once; at that bound no new entry
starts until one returns. An ``async`` or
``http`` route of the same table runs in a task of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

from cortex_flow.runtime.callpool import Call, CallPool
from cortex_flow.runtime.delivery import Entry, Outcome
from cortex_flow.runtime.handling import EntryHandler, Step
from cortex_flow.runtime.routes import CompiledRoute, HandlerExit, Overran, call_route

Steps = Generator[Step, None, Outcome]


class _Flight:
    """One entry in flight: its steps (None: the table is one sync call), and the call it
    waits for."""

    __slots__ = ("call", "entry", "overran", "route", "started", "steps")

    def __init__(self, entry: Entry, steps: Steps | None) -> None:
        self.entry = entry
        self.steps = steps
        self.route: CompiledRoute | None = None
        self.call: Call | None = None  # the sync call it waits for
        self.started = 0.0  # loop time the current call was queued
        self.overran = False


class ThreadedDriver:
    """Keeps up to ``concurrency`` entries of one group in flight from a single task.

    ``take()`` gives the next entry to start (None when none waits), ``finish(outcome)``
    takes an outcome, ``drop(entry)`` an entry that could not be finished (it stays
    pending and is retried).
    """

    def __init__(
        self,
        handler: EntryHandler,
        pool: CallPool,
        concurrency: int,
        take: Callable[[], Entry | None],
        finish: Callable[[Outcome], None],
        drop: Callable[[Entry], None],
        log: logging.Logger,
    ) -> None:
        self.handler = handler
        self.pool = pool
        self.concurrency = concurrency
        self._take = take
        self._finish = finish
        self._drop = drop
        self.log = log
        # what runs a call in its message's context (tracing on), else None: nothing per call
        self._wrap: Callable[[Entry, Any], Any] | None = getattr(handler, "wrap_call", None)
        self.in_flight = 0  # entries started and not finished, the stuck ones included
        self.stuck = 0  # of them, in a sync call past its timeout (they keep no slot)
        self._returned: list[Call] = []  # calls whose thread returned, to settle
        # (deadline, call) by timeout: calls of one timeout are queued in deadline order
        self._deadlines: dict[float, deque[tuple[float, Call]]] = {}
        self._wake: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # async and http routes
        self._flights: set[_Flight] = set()  # started, not finished
        self._closed = False  # ended (finished, failed or cancelled)
        self._loop = asyncio.get_running_loop()

    def poke(self) -> None:
        """New entries wait (or the stop came): look again."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def start(self) -> None:
        """Start the entries waiting, up to ``concurrency`` in flight; their calls go to
        the threads now. The consumer calls this as it reads them (no wait for this
        driver's task to come round), and so does :meth:`run`."""
        if self._closed:
            return
        handler = self.handler
        steps, only = handler.steps, handler.table.only_call
        # stuck calls keep their message but not its slot, up to max_stuck_calls
        while (
            self.in_flight - self.stuck < self.concurrency and self.stuck < handler.max_stuck_calls
        ):
            entry = self._take()
            if entry is None:
                break
            self.in_flight += 1
            if only is None:
                flight = _Flight(entry, steps(entry))
                self._flights.add(flight)
                self._advance(flight, None, first=True)
                continue
            # the table is one sync call: no route steps to go through
            flight = _Flight(entry, None)
            self._flights.add(flight)
            try:
                msg = handler.message(entry)
                if isinstance(msg, Outcome):  # cannot be decoded
                    self._landed(flight)
                    self._finish(msg)
                else:
                    self._queue_call(flight, only, msg)
            except Exception:
                self._lost(flight)
        self.pool.flush(self._loop)

    async def run(self) -> None:
        """Until nothing is in flight and nothing waits to start."""
        loop = self._loop
        try:
            while True:
                self.start()
                if not self.in_flight:
                    return
                if not self._returned:
                    await self._wait(loop)
                returned, self._returned = self._returned, []
                for call in returned:
                    self._settle(call, loop.time())
                self._expire(loop.time())
        except Exception:
            for flight in self._flights:  # not ours any more: the re-read takes them
                self._drop(flight.entry)
            raise
        finally:
            self._closed = True
            for task in self._tasks:
                task.cancel()
            self._abandon()

    def _abandon(self) -> None:
        """Ended with entries in flight (a stop whose grace ran out, an error): their
        calls still queued never run (a successor may take the entries now); one that
        overran leaves the ``overrunning`` gauge when its thread returns."""
        returned, self._returned = self._returned, []
        for call in returned:
            self._returned_one(call)
        for flight in self._flights:
            waiting = flight.call
            if waiting is not None and waiting.tag is flight and self.pool.cancel(waiting):
                waiting.tag = None

    async def _wait(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = wake = loop.create_future()
        timer = None
        first = None
        for timeout, queue in self._deadlines.items():
            while queue and queue[0][1].tag is None:  # settled meanwhile
                queue.popleft()
            if len(queue) > 2 * self.concurrency + 64:  # settled behind one that runs long
                self._deadlines[timeout] = queue = deque(d for d in queue if d[1].tag is not None)
            if queue and (first is None or queue[0][0] < first):
                first = queue[0][0]
        if first is not None:
            timer = loop.call_at(first, self.poke)
        try:
            await wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    def _advance(
        self, flight: _Flight, error: Exception | None, first: bool = False, value: Any = None
    ) -> None:
        """Step ``flight`` on to its next call (queued) or to its outcome (finished);
        ``value`` is what the last call returned."""
        try:
            if flight.steps is None:  # its only route returned or failed
                route = flight.route
                assert route is not None
                seconds = self._loop.time() - flight.started
                self._landed(flight)
                self._finish(self.handler.called(flight.entry, route, error, seconds, value))
                return
            try:
                if first:
                    route, msg, ctx = next(flight.steps)
                elif error is not None:
                    route, msg, ctx = flight.steps.throw(error)
                else:
                    route, msg, ctx = flight.steps.send(value)
            except StopIteration as stop:
                self._landed(flight)
                self._finish(stop.value)
                return
            if route.action == "call" and not route.is_async:
                self._queue_call(flight, route, msg)
            else:
                flight.route, flight.overran = route, False
                flight.started = self._loop.time()
                task = self._loop.create_task(self._awaited(flight, route, msg, ctx))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:
            self._lost(flight)

    def _queue_call(self, flight: _Flight, route: CompiledRoute, msg: Any) -> None:
        """Queue ``flight``'s sync call in the pool, its deadline with the others."""
        loop = self._loop
        flight.route, flight.overran = route, False
        flight.started = now = loop.time()
        fn: Any = route.fn
        if self._wrap is not None:  # tracing: the call runs in its message's span
            fn = self._wrap(flight.entry, fn)
        call = self.pool.call(loop, fn, msg, self._returned_one)
        call.tag, flight.call = flight, call
        queue = self._deadlines.get(route.timeout)
        if queue is None:
            queue = self._deadlines[route.timeout] = deque()
        queue.append((now + route.timeout, call))

    def _lost(self, flight: _Flight) -> None:
        """``flight`` could not be stepped on: given up, it stays pending and is retried."""
        self._landed(flight)
        self.log.exception(
            "group %s: %s from %s could not be finished; it stays pending and is retried",
            self.handler.name,
            flight.entry.id,
            flight.entry.key.key,
        )
        self._drop(flight.entry)

    def _landed(self, flight: _Flight) -> None:
        """``flight`` is no longer in flight (once, whatever happens after)."""
        if flight in self._flights:
            self._flights.discard(flight)
            self.in_flight -= 1

    async def _awaited(self, flight: _Flight, route: CompiledRoute, msg: Any, ctx: Any) -> None:
        """An ``async`` call or ``http`` post among the routes: awaited, then stepped on."""
        value: Any = None
        try:
            if route.action in ("http", "a2a"):
                value = await self.handler.post(route, msg, ctx)
            elif route.is_async:
                value = await self.handler.run_async(route, msg, flight.entry)
            else:
                value = await call_route(route, msg, deadlines=self.handler.deadlines)
        except Exception as exc:
            self._advance(flight, exc)
        else:
            self._advance(flight, None, value=value)
        self.poke()  # room for the next entry, or the last one finished

    def _returned_one(self, call: Call) -> None:
        if self._closed:  # nobody settles it any more
            flight: _Flight | None = call.tag
            call.tag = None
            if flight is not None and flight.overran:
                self.stuck -= 1
                self.handler.overrun_ended(stuck=self.stuck)
            return
        self._returned.append(call)
        self.poke()

    def _settle(self, call: Call, now: float) -> None:
        flight: _Flight = call.tag
        call.tag = None
        route = flight.route
        assert route is not None
        error: Exception | None = None
        if flight.overran:
            self.stuck -= 1
            self.handler.overrun_ended(stuck=self.stuck)
            error = Overran(route.timeout, now - flight.started)
        elif isinstance(call.error, Exception):
            error = call.error
        elif call.error is not None:  # SystemExit and the like: a failure
            error = HandlerExit.of(route, call.error)
        self._advance(flight, error, value=call.value)

    def _expire(self, now: float) -> None:
        """Calls past their timeout: taken back if still queued, else said to overrun."""
        for queue in list(self._deadlines.values()):  # stepping on may add a timeout
            while queue and queue[0][0] <= now:
                _, call = queue.popleft()
                flight: _Flight | None = call.tag
                if flight is None:  # returned and settled
                    continue
                route = flight.route
                assert route is not None
                if self.pool.cancel(call):  # still queued: it never ran
                    call.tag = None
                    self._advance(flight, TimeoutError(f"timed out after {route.timeout:g}s"))
                elif not call.returned:  # returned in time, not handed back yet: it is done
                    flight.overran = True
                    self.stuck += 1
                    self.pool.stuck(call)
                    self.handler.overrun_started(route, flight.entry, stuck=self.stuck)
