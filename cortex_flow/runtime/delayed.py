"""The delayed-message mover: a duty (one runner at a time) that moves due messages.

Every :data:`INTERVAL` the holder of the ``delayed`` duty runs one fenced script
(:func:`cortex_flow.wire.delayed.move_due`) that XADDs every due message to its stream
and removes it from its set in the same step. A message is so delivered no earlier than
its due time and within about ``INTERVAL`` (plus a round trip) after; one whose time
came while no runner was up is moved by the first turn of the next holder.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cortex_flow.flow.topology import Resolved
from cortex_flow.wire.delayed import move_due
from cortex_flow.wire.duties import Fence

INTERVAL = 0.25  # seconds between two turns of the holder
WARN_EVERY = 60.0  # a set whose stream refuses its messages is logged at most this often


class DelayedMover:
    """Moves the due delayed messages of one namespace; ``moved`` counts them."""

    def __init__(self, client: Any, resolved: Resolved, log: logging.Logger) -> None:
        self.client = client
        self.resolved = resolved
        self.log = log
        self.moved = 0
        self._warned: dict[str, float] = {}

    async def run(self, fence: Fence) -> None:
        moved, failed = await move_due(self.client, self.resolved.namespace, fence)
        self.moved += moved
        now = time.monotonic()
        for name, error in failed:
            if now - self._warned.get(name, -WARN_EVERY) >= WARN_EVERY:
                self._warned[name] = now
                self.log.warning(
                    "delayed messages in %s cannot be moved to their stream (%s); they stay "
                    "held and are tried again every 5s: fix the key or cancel them with "
                    "cortex-flow delayed cancel",
                    name,
                    error,
                )


__all__ = ["INTERVAL", "DelayedMover"]
