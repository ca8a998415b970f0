"""Saying that Redis is in a passing bad state, without saying it 75,000 times.

Each reason (see :mod:`cortex_flow.wire.faults`) is counted in the group's stats every
time, and logged at most once per ``EVERY`` seconds with how often it happened since.
A refusal that retrying soon will not fix (an ACL, credentials, a TLS certificate, a
host name: :mod:`cortex_flow.wire.redis_errors`) is also kept as a problem of the group,
shown by ``status`` and ``/readyz`` until the same work succeeds again.
"""

from __future__ import annotations

import logging
import time

from cortex_flow.runtime.stats import GroupStats
from cortex_flow.wire.faults import error_text
from cortex_flow.wire.redis_errors import Explained, explain

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


# what a refusal stops, by area of GroupStats.problems
AREAS = {
    "blocked": "blocked: reads and claims of its own entries are refused",
    "recovery": "crash recovery is off: claims of entries idle past claim_idle are refused",
    "commit": "commits wait: acknowledging and publishing are refused",
}
RECOVERED = {
    "blocked": "reads work again",
    "recovery": "crash recovery works again",
    "commit": "commits go through again",
}


class FaultLog:
    """Counts and (rate-limited) logs one group's passing Redis errors and refusals."""

    def __init__(
        self, group: str, stats: GroupStats, log: logging.Logger, *, user: str = "default"
    ) -> None:
        self.group = group
        self.stats = stats
        self.log = log
        self.user = user  # the Redis ACL user, named in refusals
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
        explained = explain(exc, user=self.user)
        detail = explained.text if explained is not None else error_text(exc)
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

    def refused(self, area: str, why: Explained, then: str) -> None:
        """Redis refused ``area``'s work (see :data:`AREAS`) for ``why``: kept as a problem
        of the group and counted under ``why.kind``; logged as an error once per ``EVERY``."""
        errors = self.stats.redis_errors
        errors[why.kind] = errors.get(why.kind, 0) + 1
        self.stats.problems[area] = f"{AREAS[area]}: {why.text}"
        key = f"refused:{area}"
        self._since[key] = self._since.get(key, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(key, -EVERY) < EVERY:
            return
        self._logged[key] = now
        count, self._since[key] = self._since[key], 0
        self.log.error(
            "group %s: %s: %s; %s (%d time%s since last said)",
            self.group,
            AREAS[area],
            why.text,
            then,
            count,
            "" if count == 1 else "s",
        )

    def cleared(self, area: str) -> None:
        """``area``'s work succeeded: its problem, if any, is gone (and the log says so)."""
        if self.stats.problems.pop(area, None) is not None:
            self._logged.pop(f"refused:{area}", None)
            self.log.info("group %s: %s", self.group, RECOVERED[area])
