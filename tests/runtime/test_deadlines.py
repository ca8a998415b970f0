"""Async call timeouts from one watchdog: cut off at the timeout, stops pass through."""

from __future__ import annotations

import asyncio

import pytest

from cortex_flow.runtime.deadlines import Deadlines


async def test_a_call_past_its_timeout_raises_timeout_error() -> None:
    """A hung call is cancelled by the watchdog and raises TimeoutError, with no
    cancellation left on the task that ran it."""
    deadlines = Deadlines()
    with pytest.raises(TimeoutError, match=r"timed out after 0\.05s"):
        await deadlines.run(lambda msg: asyncio.sleep(10), {}, 0.05)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await deadlines.close()


async def test_a_call_that_swallows_its_cancellation_still_times_out() -> None:
    """A call that catches CancelledError and returns is still reported as timed out."""

    async def stubborn(msg: object) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return

    deadlines = Deadlines()
    with pytest.raises(TimeoutError):
        await deadlines.run(stubborn, {}, 0.02)
    await asyncio.sleep(0)  # no cancellation left over for what runs next
    await deadlines.close()


async def test_quick_calls_and_a_stop_are_not_timeouts() -> None:
    """Calls within their timeout return; cancelling the task (a stop) is a cancellation."""
    deadlines = Deadlines()
    results = []

    async def quick(msg: int) -> None:
        await asyncio.sleep(0.001)
        results.append(msg)

    await asyncio.gather(*(deadlines.run(quick, n, 1.0) for n in range(50)))
    assert sorted(results) == list(range(50))
    task = asyncio.create_task(deadlines.run(lambda msg: asyncio.sleep(10), {}, 5.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await deadlines.close()
