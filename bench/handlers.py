"""The trivial handlers every benchmark uses, for cortex-flow (``call:``) and the baselines alike.

cortex-flow imports them by name (``bench.handlers:noop``); the baselines call the same
functions, so both sides pay the same handler cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

COUNTER = [0]
SAMPLES: list[float] = []


def noop(msg: Mapping[str, Any]) -> None:
    """Does nothing: the figure is the runtime's own cost."""


def count(msg: Mapping[str, Any]) -> None:
    """Counts handled messages (the memory benchmark reads the count)."""
    COUNTER[0] += 1


def record_latency(msg: Mapping[str, Any]) -> None:
    """For entries with a ``sent`` field (epoch seconds): record now - sent."""
    sent = msg.get("sent")
    if sent is not None:
        SAMPLES.append(time.time() - float(sent))


def reset() -> None:
    COUNTER[0] = 0
    SAMPLES.clear()


async def anoop(msg: Mapping[str, Any]) -> None:
    """An ``async def`` that does nothing: the figure is the async call path's own cost."""


async def io_wait(msg: Mapping[str, Any]) -> None:
    """Awaits 50 ms: a stand-in for a model or API call (I/O-bound)."""
    await asyncio.sleep(0.05)


def io_block(msg: Mapping[str, Any]) -> None:
    """Blocks 50 ms: a model or API call over a sync client (it holds its thread)."""
    time.sleep(0.05)


async def arecord_latency(msg: Mapping[str, Any]) -> None:
    """``record_latency`` as an ``async def`` (the async call path)."""
    record_latency(msg)


async def answer(msg: Mapping[str, Any]) -> dict[str, Any]:
    """A trivial request handler: its reply is a small mapping."""
    return {"ok": True, "n": msg.get("n")}
