"""A runner's side of a shared token bucket: tokens for a batch per call, a small reserve.

Every call takes the tokens a whole batch of entries wants in one script
(:func:`cortex_flow.wire.flowcontrol.take_tokens`). While a bucket is far from empty
(it had at least twice :attr:`RateLimiter.spare` left after the last take), the runner
also takes ``spare`` tokens more (up to fifty batches' worth, never over the burst) and
keeps them for up to :data:`RESERVE_FOR`: the next batches start from that reserve
without a round trip (:meth:`RateLimiter.take_reserved`), and the reserve is topped up
in the background. Near the limit no reserve is kept, so the rate across runners stays
the bucket's. Reserved tokens left unused expire with their reserve: the rate can only
come out lower, never higher.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from cortex_flow.wire.flowcontrol import take_tokens

CHUNK = 0.1  # when tokens run out, wait for this many seconds' worth (or what is wanted)
RESERVE_FOR = 1.0  # seconds a reserve of tokens is kept before it lapses


class RateLimiter:
    """Tokens from the buckets of one group's ``rate_limit``; ``per_s`` and ``burst``."""

    def __init__(
        self, client: Any, per_s: float, burst: int, batch: int, log: logging.Logger
    ) -> None:
        self.client = client
        self.per_ms = per_s / 1000
        self.burst = burst
        # at most half the burst: a bucket that fills to its burst while every runner
        # still sleeps drops tokens, and the rate comes out under the limit
        self.chunk = max(1, min(math.ceil(burst / 2), math.ceil(per_s * CHUNK)))
        self.spare = max(1, min(burst, 50 * batch))
        self.log = log
        self._reserve: dict[str, tuple[int, float]] = {}  # bucket -> (tokens, taken at)
        self._far: set[str] = set()  # buckets that had plenty left at the last take
        self._topping: dict[str, asyncio.Task[None]] = {}

    def take_reserved(self, wants: dict[str, int]) -> bool:
        """Take every token wanted from the reserves, without a round trip, or none."""
        now = time.monotonic()
        for bucket, want in wants.items():
            tokens, at = self._reserve.get(bucket, (0, 0.0))
            if tokens < want or now - at > RESERVE_FOR:
                return False
        for bucket, want in wants.items():
            self._from_reserve(bucket, want)
            self._top_up(bucket)
        return True

    async def take(self, wants: dict[str, int]) -> tuple[dict[str, int], float]:
        """Tokens granted per bucket (at most what each wants), and the seconds to wait
        before asking again for what was not granted (0 when all was)."""
        granted, asks = {}, {}
        for bucket, want in wants.items():
            got = self._from_reserve(bucket, want)
            granted[bucket] = got
            if got < want:
                asks[bucket] = want - got
            elif bucket in self._far:
                self._top_up(bucket)
        if not asks:
            return granted, 0.0
        buckets = list(asks)
        extra = {b: self.spare if b in self._far else 0 for b in buckets}
        rows = [(asks[b] + extra[b], self.chunk) for b in buckets]
        answers = await take_tokens(self.client, buckets, self.per_ms, self.burst, rows)
        waits = []
        for bucket, (got, ms, left) in zip(buckets, answers, strict=True):
            used = min(got, asks[bucket])
            granted[bucket] += used
            self._keep(bucket, got - used, left)
            if used < asks[bucket]:
                waits.append(ms / 1000)
        return granted, min(waits, default=0.0)

    def _from_reserve(self, bucket: str, want: int) -> int:
        tokens, at = self._reserve.get(bucket, (0, 0.0))
        if not tokens or time.monotonic() - at > RESERVE_FOR:
            self._reserve.pop(bucket, None)
            return 0
        used = min(tokens, want)
        self._reserve[bucket] = (tokens - used, at)
        return used

    def _keep(self, bucket: str, surplus: int, left: int) -> None:
        """Record what a take left: a surplus for the reserve, and whether the bucket is far
        from empty (then the next takes reserve too)."""
        if left >= 2 * self.spare:
            self._far.add(bucket)
        else:
            self._far.discard(bucket)
        if surplus > 0:
            tokens, _ = self._reserve.get(bucket, (0, 0.0))
            self._reserve[bucket] = (tokens + surplus, time.monotonic())

    def _top_up(self, bucket: str) -> None:
        tokens, _ = self._reserve.get(bucket, (0, 0.0))
        running = self._topping.get(bucket)
        if tokens * 2 >= self.spare or (running is not None and not running.done()):
            return
        self._topping[bucket] = asyncio.create_task(self._topping_up(bucket, self.spare - tokens))

    async def _topping_up(self, bucket: str, want: int) -> None:
        try:
            [(got, _, left)] = await take_tokens(
                self.client, [bucket], self.per_ms, self.burst, [(want, 0)]
            )
        except Exception as exc:  # the next take asks again, on the critical path
            self.log.debug("rate limit: top-up of %s failed: %s", bucket, exc)
            return
        self._keep(bucket, got, left)

    def close(self) -> None:
        for task in self._topping.values():
            task.cancel()


__all__ = ["RateLimiter"]
