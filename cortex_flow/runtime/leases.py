"""Leases: while a consumer holds entries, it keeps them from idling into ``claim_idle``.

Every third of ``claim_idle`` the consumer re-claims to itself what it holds (running,
waiting in its backlog, or waiting to be committed): ``XCLAIM ... 0 ... JUSTID`` resets
an entry's idle time without counting a delivery. Another runner's idle claim then
takes only entries whose runner stopped renewing (it died or lost Redis), about
``claim_idle`` after the last renewal. So ``claim_idle`` need not outlast the longest
call: a ten-minute model call under ``claim_idle: 30s`` runs once.

The renewal is one script per key, which re-claims an ID only while this consumer still
owns it: an entry another consumer took over meanwhile is left to it (XCLAIM alone would
take it back). Where scripts cannot run, plain XCLAIM JUSTID is the fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.runtime.delivery import scripting_unavailable
from cortex_flow.runtime.faultlog import FaultLog
from cortex_flow.runtime.stats import GroupStats
from cortex_flow.wire.faults import passing_reason

WARN_EVERY = 60.0  # an unexpected renewal error is logged at most this often

# KEYS[1] the stream, ARGV[1] the group, ARGV[2] this consumer, ARGV[3..] the IDs held.
# Returns the IDs renewed: those still owned by this consumer.
RENEW = """
local renewed = {}
for i = 3, #ARGV do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if row and row[2] == ARGV[2] then renewed[#renewed + 1] = ARGV[i] end
end
for from = 1, #renewed, 1000 do
  local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
  for j = from, math.min(from + 999, #renewed) do args[#args + 1] = renewed[j] end
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
end
return renewed
"""


class Leases:
    """Renews one consumer's hold on the entries it has, one round trip per key."""

    def __init__(self, client: Any, group: str, consumer: str, log: logging.Logger) -> None:
        self.client = client
        self.group = group
        self.consumer = consumer
        self.log = log
        self._script: Any = client.register_script(RENEW)
        self.lost = 0  # entries found owned by another consumer at a renewal
        self._warned_at = -WARN_EVERY  # when an unexpected renewal error was last logged

    async def keep(
        self, held: set[tuple[str, str]], every: float, stats: GroupStats, faults: FaultLog
    ) -> None:
        """Renew ``held`` (the consumer's live set of (key, id)) every ``every`` seconds,
        until cancelled; counts lost leases in ``stats``, passing errors in ``faults``."""
        while True:
            await asyncio.sleep(every)
            by_key: dict[str, list[str]] = {}
            for key, entry_id in list(held):
                by_key.setdefault(key, []).append(entry_id)
            if not by_key:
                continue
            try:
                stats.leases_lost += len(await self.renew(by_key, held))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = passing_reason(exc)
                if reason is not None:
                    faults.report(reason, exc, "renewing leases again next time")
                    continue
                now = time.monotonic()
                if now - self._warned_at >= WARN_EVERY:
                    self._warned_at = now
                    self.log.warning(
                        "group %s: renewing the leases of %s failed (%s: %s); trying again "
                        "every %.1fs (logged once a minute)",
                        self.group,
                        self.consumer,
                        type(exc).__name__,
                        exc,
                        every,
                    )

    async def renew(
        self, held: Mapping[str, Sequence[str]], still: set[tuple[str, str]] | None = None
    ) -> set[tuple[str, str]]:
        """Re-claim ``held`` (key -> IDs); returns the (key, id) no longer ours.

        ``still``: the consumer's live set; an entry that left it meanwhile (acknowledged
        while the renewal ran) is not pending any more, not taken over.
        """
        gone: set[tuple[str, str]] = set()
        for key, ids in held.items():
            if not ids:
                continue
            renewed = await self._renew_key(key, list(ids))
            gone.update((key, i) for i in ids if i not in renewed)
        if still is not None:
            gone &= still
        if gone:
            self.lost += len(gone)
            self.log.warning(
                "group %s: %d entr%s held by %s were taken over by another consumer (its "
                "lease was not renewed in time, e.g. Redis did not answer) or are no longer "
                "pending to it (a failover dropped the delivery); both may run them",
                self.group,
                len(gone),
                "y" if len(gone) == 1 else "ies",
                self.consumer,
            )
        return gone

    async def _renew_key(self, key: str, ids: list[str]) -> set[str]:
        if self._script is not None:
            try:
                reply = await self._script(keys=[key], args=[self.group, self.consumer, *ids])
                return {str(i) for i in reply}
            except ResponseError as exc:
                if not scripting_unavailable(exc):
                    raise
                self.log.warning(
                    "group %s: the lease script cannot run (%s); renewing with XCLAIM alone",
                    self.group,
                    exc,
                )
                self._script = None
        reply = await self.client.xclaim(
            key, self.group, self.consumer, min_idle_time=0, message_ids=ids, justid=True
        )
        return {str(i) for i in reply}
