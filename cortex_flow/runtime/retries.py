"""When this consumer's failed entries are due again: a timer, not a poll of every key.

A failed entry stays pending; its due time (now + the backoff for its delivery count) is
kept here. The consumer takes due entries back (XCLAIM) and wakes for the next one, so
a backoff schedule holds however many messages are failing. An entry that failed again
or was re-read since keeps only its latest due time.
"""

from __future__ import annotations

import heapq
import time
from typing import Any


class RetryTimer:
    """Due times of failed entries, soonest first."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str, str, int]] = []  # (due, key, id, deliveries)
        self._due: dict[tuple[str, str], float] = {}  # the current due time of each

    def __bool__(self) -> bool:
        return bool(self._heap)

    def schedule(self, key: str, entry_id: str, deliveries: int, wait: float) -> None:
        """``entry_id`` of ``key`` failed on delivery ``deliveries``: due in ``wait`` s."""
        due = time.monotonic() + wait
        self._due[(key, entry_id)] = due
        heapq.heappush(self._heap, (due, key, entry_id, deliveries))

    def next_due(self) -> float | None:
        """The monotonic time the soonest entry is due (None: nothing waits)."""
        return self._heap[0][0] if self._heap else None

    def clear(self) -> None:
        """Forget every due time (the consumer re-reads all its pending entries anyway)."""
        self._heap.clear()
        self._due.clear()

    def take_due(
        self, now: float, room: int, held: set[tuple[str, str]]
    ) -> dict[str, list[dict[str, Any]]]:
        """Up to ``room`` entries due by ``now``, as XPENDING-like rows by key; those in
        ``held`` (taken back meanwhile) are dropped."""
        by_key: dict[str, list[dict[str, Any]]] = {}
        heap = self._heap
        while heap and heap[0][0] <= now and room > 0:
            due, key, entry_id, deliveries = heapq.heappop(heap)
            if self._due.get((key, entry_id)) != due:
                continue  # failed again since, or re-read: a later due time stands
            del self._due[(key, entry_id)]
            if (key, entry_id) in held:
                continue
            by_key.setdefault(key, []).append(
                {"message_id": entry_id, "times_delivered": deliveries}
            )
            room -= 1
        return by_key
