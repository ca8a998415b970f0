"""The call pool hands sync calls to threads and their results back to the loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from cortex_flow.runtime.callpool import CallPool


async def test_every_call_gets_its_own_result_or_error() -> None:
    """Results and exceptions reach the right waiter, however completions are batched."""
    pool = CallPool(threads=4)
    loop = asyncio.get_running_loop()

    def work(n: int) -> int:
        if n % 7 == 0:
            raise ValueError(f"bad {n}")
        return n * n

    try:
        waiters = [pool.call(loop, work, n).waiter for n in range(200)]
        results = await asyncio.gather(*waiters, return_exceptions=True)
    finally:
        pool.shutdown()
    for n, result in enumerate(results):
        if n % 7 == 0:
            assert isinstance(result, ValueError) and str(result) == f"bad {n}"
        else:
            assert result == n * n


async def test_a_waiter_given_up_is_skipped_and_the_thread_still_finishes() -> None:
    """Cancelling the awaitable (a timeout) leaves the thread to finish; nothing breaks."""
    pool = CallPool(threads=2)
    loop = asyncio.get_running_loop()
    try:
        call = pool.call(loop, lambda _: time.sleep(0.05) or "done", None)
        waiter = call.waiter
        assert waiter is not None
        waiter.cancel()
        assert await call.returning() == "done"
        again = pool.call(loop, lambda n: n + 1, 1).waiter
        assert await again == 2
    finally:
        pool.shutdown()
    with pytest.raises(asyncio.CancelledError):
        await waiter
