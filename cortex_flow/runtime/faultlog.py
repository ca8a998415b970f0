"""Saying that Redis is in a passing bad state, without saying it 75,000 times.

Each reason (see :mod:`cortex_flow.wire.faults`) is counted in the group's stats every
time, and logged at most once per ``EVERY`` seconds with how often it happened since.
"""

from __future__ import annotations

import logging
import time

from cortex_flow.runtime.stats import GroupStats
from cortex_flow.wire.faults import error_text

EVERY = 10.0

WHAT = {
    "unreachable": "Redis does not answer",
    "oom": "Redis is out of memory (maxmemory)",
    "readonly": "Redis is read-only (a replica, or a failover under way)",
    "loading": "Redis is loading its data",
    "failover": "the Redis master is down or moving",
    "busy": "Redis is busy running a script",
    "misconf": "Redis refuses writes (MISCONF: it cannot persist)",
}


class FaultLog:
    """Counts and (rate-limited) logs one group's passing Redis errors."""

    def __init__(self, group: str, stats: GroupStats, log: logging.Logger) -> None:
        self.group = group
        self.stats = stats
        self.log = log
        self._since: dict[str, int] = {}  # occurrences not yet logged, by reason
        self._logged: dict[str, float] = {}  # when each reason was last logged

    def report(self, reason: str, exc: BaseException, then: str) -> None:
        """Count ``exc`` (a passing error for ``reason``); ``then`` says what happens next."""
        errors = self.stats.redis_errors
        errors[reason] = errors.get(reason, 0) + 1
        self._since[reason] = self._since.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(reason, -EVERY) < EVERY:
            return
        self._logged[reason] = now
        count, self._since[reason] = self._since[reason], 0
        detail = error_text(exc)
        self.log.warning(
            "group %s: %s (%s); %s. Outcomes are kept and committed once it recovers; "
            "nothing is counted as a failure or dead-lettered for it (%d time%s since "
            "last said)",
            self.group,
            WHAT.get(reason, f"Redis refused ({reason})"),
            detail,
            then,
            count,
            "" if count == 1 else "s",
        )
