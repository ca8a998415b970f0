"""Running a group whose routes call sync functions: many entries, one task, no future each.

A sync ``call`` always waits for a thread, so the general path (a worker task per
entry in flight, a future and a timeout per call) spends most of its time on that
bookkeeping rather than on the handlers. Here one task keeps up to ``concurrency``
entries in flight: it steps each entry's routes (:meth:`EntryHandler.steps`), queues
their sync calls in the :class:`~cortex_flow.runtime.callpool.CallPool` (the calls of
one pass reach the threads in one hand-over), and is told of the calls that returned
in runs. Timeouts are kept in one heap: a call still queued at its timeout is taken
back and fails as timed out; one already running cannot be stopped, so it is said to
overrun (stuck): its entry stays held and fails as timed out once it returns, but its
slot goes to the next entry, up to the group's ``max_stuck_calls`` stuck at once; at
that bound no new entry starts until one returns. An ``async`` or
``http`` route of the same table runs in a task of its own.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable, Generator
from typing import Any

from cortex_flow.runtime.callpool import Call, CallPool
from cortex_flow.runtime.delivery import Entry, Outcome
from cortex_flow.runtime.handling import EntryHandler, Step
from cortex_flow.runtime.routes import CompiledRoute, HandlerExit, Overran, call_route

Steps = Generator[Step, None, Outcome]


class _Flight:
    """One entry in flight: its steps, and the call it waits for."""

    __slots__ = ("entry", "overran", "route", "started", "steps")

    def __init__(self, entry: Entry, steps: Steps) -> None:
        self.entry = entry
        self.steps = steps
        self.route: CompiledRoute | None = None
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
        self.in_flight = 0  # entries started and not finished, the stuck ones included
        self.stuck = 0  # of them, in a sync call past its timeout (they keep no slot)
        self._returned: list[Call] = []  # calls whose thread returned, to settle
        self._deadlines: list[tuple[float, int, Call]] = []  # a heap
        self._order = itertools.count()
        self._wake: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # async and http routes
        self._flights: set[_Flight] = set()  # started, not finished

    def poke(self) -> None:
        """New entries wait (or the stop came): look again."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def run(self) -> None:
        """Until nothing is in flight and nothing waits to start."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                # stuck calls keep their message but not its slot, up to max_stuck_calls
                while (
                    self.in_flight - self.stuck < self.concurrency
                    and self.stuck < self.handler.max_stuck_calls
                ):
                    entry = self._take()
                    if entry is None:
                        break
                    self.in_flight += 1
                    flight = _Flight(entry, self.handler.steps(entry))
                    self._flights.add(flight)
                    self._advance(flight, None, first=True)
                if not self.in_flight:
                    return
                self.pool.flush(loop)  # this pass's calls to the threads now
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
            for task in self._tasks:
                task.cancel()

    async def _wait(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = wake = loop.create_future()
        timer = None
        heap = self._deadlines
        while heap and heap[0][2].tag is None:  # settled meanwhile
            heapq.heappop(heap)
        if heap:
            timer = loop.call_at(heap[0][0], self.poke)
        try:
            await wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    def _advance(
        self, flight: _Flight, error: BaseException | None, first: bool = False, value: Any = None
    ) -> None:
        """Step ``flight`` on to its next call (queued) or to its outcome (finished);
        ``value`` is what the last call returned."""
        try:
            try:
                if first:
                    route, msg, ctx = next(flight.steps)
                elif error is not None:
                    route, msg, ctx = flight.steps.throw(error)
                else:
                    route, msg, ctx = flight.steps.send(value)
            except StopIteration as stop:
                self.in_flight -= 1
                self._flights.discard(flight)
                self._finish(stop.value)
                return
            loop = asyncio.get_running_loop()
            flight.route, flight.overran = route, False
            flight.started = now = loop.time()
            if route.action == "call" and not route.is_async:
                call = self.pool.call(loop, route.fn, msg, self._returned_one)  # type: ignore[arg-type]
                call.tag = flight
                heapq.heappush(self._deadlines, (now + route.timeout, next(self._order), call))
            else:
                task = loop.create_task(self._awaited(flight, route, msg, ctx))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:
            self.in_flight -= 1
            self._flights.discard(flight)
            self.log.exception(
                "group %s: %s from %s could not be finished; it stays pending and is retried",
                self.handler.name,
                flight.entry.id,
                flight.entry.key.key,
            )
            self._drop(flight.entry)

    async def _awaited(self, flight: _Flight, route: CompiledRoute, msg: Any, ctx: Any) -> None:
        """An ``async`` call or ``http`` post among the routes: awaited, then stepped on."""
        value: Any = None
        try:
            if route.action == "http":
                await self.handler.post(route, msg, ctx)
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
        self._returned.append(call)
        self.poke()

    def _settle(self, call: Call, now: float) -> None:
        flight: _Flight = call.tag
        call.tag = None
        route = flight.route
        assert route is not None
        error = call.error
        if flight.overran:
            self.stuck -= 1
            self.handler.overrun_ended(stuck=self.stuck)
            error = Overran(route.timeout, now - flight.started)
        elif error is not None and not isinstance(error, Exception):
            error = HandlerExit.of(route, error)  # SystemExit and the like: a failure
        self._advance(flight, error, value=call.value)

    def _expire(self, now: float) -> None:
        """Calls past their timeout: taken back if still queued, else said to overrun."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, call = heapq.heappop(heap)
            flight: _Flight | None = call.tag
            if flight is None:  # returned and settled
                continue
            route = flight.route
            assert route is not None
            if self.pool.cancel(call):  # still queued: it never ran
                call.tag = None
                self._advance(flight, TimeoutError(f"timed out after {route.timeout:g}s"))
            else:
                flight.overran = True
                self.stuck += 1
                self.pool.stuck(call)
                self.handler.overrun_started(route, flight.entry, stuck=self.stuck)
