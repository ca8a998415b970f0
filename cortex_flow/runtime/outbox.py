"""Finished outcomes of one consumer, committed together.

Handlers put their outcomes here; one flusher task commits them in one round trip, at
most ``FLUSH_DELAY`` after the first, at once when a batch is full or nothing else runs.
A commit that Redis refuses for a passing reason (no answer, out of memory, read-only,
loading) is tried again with backoff: it counts neither as a delivery nor as a failure.
So is one refused by an ACL (a problem of the group until it goes through): granting
the permission lets the outcomes through, none is lost meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import ResponseError

from cortex_flow.runtime.commit import CommitDeferred, Committer
from cortex_flow.runtime.delivery import ACK, DEAD, RETRY, TRANSIENT, Outcome
from cortex_flow.runtime.faultlog import FaultLog
from cortex_flow.wire.faults import CLUSTER_ERRORS, passing_reason
from cortex_flow.wire.redis_errors import explain

# finished outcomes wait at most this long to be committed with others (one round trip)
FLUSH_DELAY = 0.002


async def commit_until_done(
    committer: Committer,
    outcomes: list[Outcome],
    faults: FaultLog,
    on_retry: Callable[[Outcome], None],
) -> None:
    """Commit ``outcomes``, waiting out passing Redis errors; ``on_retry`` gets each RETRY
    once committed. Any other error is raised. A stop whose grace runs out cancels this:
    what was not committed stays pending."""
    retries = [o for o in outcomes if o.kind == RETRY]
    delay = 0.05
    while True:
        try:
            await committer.commit(outcomes)
            break
        except CommitDeferred as exc:
            outcomes = exc.outcomes  # the rest was applied
            faults.report(exc.reason, exc, f"committing again in {delay:.2g}s")
        except (*TRANSIENT, *CLUSTER_ERRORS, ResponseError) as exc:
            reason = passing_reason(exc)
            why = (
                explain(exc, user=faults.user, keys=_keys(committer, outcomes))
                if reason is None
                else None
            )
            if why is not None and why.kind == "acl":
                faults.refused("commit", why, "the outcomes are kept and committed once allowed")
            elif reason is None:
                raise
            else:
                faults.report(reason, exc, f"committing again in {delay:.2g}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
    if faults.stats.problems:
        faults.cleared("commit")
    for outcome in retries:
        on_retry(outcome)


def _keys(committer: Committer, outcomes: list[Outcome]) -> list[str]:
    """Every key a commit of ``outcomes`` writes: sources, publish targets, dead letters."""
    keys = {o.entry.key.key for o in outcomes} | {p.key for o in outcomes for p in o.publishes}
    if committer.dead_letter_key and any(o.kind == DEAD for o in outcomes):
        keys.add(committer.dead_letter_key)
    return sorted(keys)


class Outbox:
    """Collects outcomes and commits them from one flusher task.

    ``done(outcomes)`` is told after each commit (committed or not: the consumer stops
    holding them); ``failed()`` after a commit failed for a reason that is not passing.
    """

    def __init__(
        self,
        commit: Callable[[list[Outcome]], Awaitable[None]],
        *,
        batch: int,
        done: Callable[[list[Outcome]], None],
        failed: Callable[[], None],
        group: str,
        log: logging.Logger,
    ) -> None:
        self._commit = commit
        self.batch = batch
        self._done = done
        self._failed = failed
        self.group = group
        self.log = log
        self.outcomes: list[Outcome] = []
        self._ready = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.outcomes)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"commit:{self.group}")

    def put(self, outcome: Outcome, *, batch_ended: bool, read: bool = False) -> None:
        """Add an outcome; ``batch_ended``: nothing else runs or waits, commit now.
        ``read``: a read is about to take the outcomes waiting (:meth:`take`): commit
        them only if it has not after ``FLUSH_DELAY``."""
        self.outcomes.append(outcome)
        self._ready.set()
        if not read and (batch_ended or len(self.outcomes) >= self.batch):
            self._full.set()

    def plain(self) -> int:
        """How many of the outcomes waiting are plain acknowledgements, if all are."""
        for outcome in self.outcomes:
            if outcome.kind != ACK or outcome.publishes:
                return 0
        return len(self.outcomes)

    def take(self) -> list[Outcome]:
        """Take back the outcomes waiting (not those being committed)."""
        outcomes, self.outcomes = self.outcomes, []
        return outcomes

    def put_all(self, outcomes: list[Outcome]) -> None:
        """Add a batch's outcomes and commit them now."""
        self.outcomes.extend(outcomes)
        self._ready.set()
        self._full.set()

    async def close(self) -> None:
        """Commit what finished and end the flusher (never cut off mid-commit)."""
        self._closing = True
        self._ready.set()
        self._full.set()
        task, self._task = self._task, None
        if task is not None:
            await task
        await self._flush()

    def cancel(self) -> asyncio.Task[None] | None:
        """Stop the flusher now (a stop whose grace ran out); returns its task to await."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def _loop(self) -> None:
        while not self._closing:
            await self._ready.wait()
            if not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), FLUSH_DELAY)
            try:
                await self._flush()
            except Exception:
                # the flusher must outlive one failed commit, or nothing would be committed
                # again; what it held stays pending and is taken back by the consumer
                self.log.exception(
                    "group %s: committing finished messages failed; they stay pending and "
                    "are taken back",
                    self.group,
                )
                self._failed()

    async def _flush(self) -> None:
        outcomes, self.outcomes = self.outcomes, []
        self._ready.clear()
        self._full.clear()
        if not outcomes:
            return
        try:
            await self._commit(outcomes)
        finally:
            self._done(outcomes)
