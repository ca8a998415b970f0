"""The duty of deleting dead consumers from the groups, without losing what they held.

A consumer is dead when its name is not a runner that beats now (nor an agent that is
up) and Redis has seen nothing from it for ``runner.dead_consumer_idle``. Its pending
entries are claimed first (by this runner's consumer of the group, the usual way); it is
deleted (XGROUP DELCONSUMER) only by a script that finds nothing pending for it, since
deleting a consumer drops its pending entries from the group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from cortex_flow.flow.durations import humanize
from cortex_flow.flow.topology import Resolved
from cortex_flow.wire.duties import Fence
from cortex_flow.wire.groups import delete_idle_consumer

# claim ``consumer``'s entries in ``group``: (group, consumer, XCLAIM min-idle in ms)
Claim = Callable[[str, str, int], None]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DeadConsumers:
    """Finds and deletes dead consumers of the declared groups (one pass per act)."""

    def __init__(
        self,
        client: Any,
        resolved: Resolved,
        *,
        idle: float,
        live: Callable[[], set[str]],
        claim: Claim,
        log: logging.Logger,
    ) -> None:
        self.client = client
        self.resolved = resolved
        self.idle = idle
        self.live = live
        self.claim = claim
        self.log = log
        self.deleted = 0

    async def run(self, fence: Fence) -> None:
        """One pass: every declared group's consumers, read in one pipeline."""
        live = self.live() | {self.resolved.runner}
        idle_ms = int(self.idle * 1000)
        pairs = [(g.name, k.key) for g in self.resolved.groups.values() for k in g.keys]
        if not pairs:
            return
        pipe = self.client.pipeline(transaction=False)
        for group, key in pairs:
            pipe.xinfo_consumers(key, group)
        replies = await pipe.execute(raise_on_error=False)
        for (group, key), consumers in zip(pairs, replies, strict=True):
            if isinstance(consumers, ResponseError):
                continue  # no key or no group yet: nothing to clean
            if isinstance(consumers, BaseException):
                raise consumers
            for row in consumers:
                name = _text(row["name"])
                if name not in live and int(row["idle"]) >= idle_ms:
                    await self._remove(fence, group, key, name, row, idle_ms)

    async def _remove(
        self, fence: Fence, group: str, key: str, name: str, row: Any, idle_ms: int
    ) -> None:
        idle = humanize(int(row["idle"]) / 1000)
        if int(row["pending"]) > 0:
            self.log.info(
                "group %s: consumer %s on %s is idle for %s with %d pending; claiming them "
                "before deleting it",
                group,
                name,
                key,
                idle,
                int(row["pending"]),
            )
            self.claim(group, name, idle_ms)
        elif await delete_idle_consumer(self.client, fence, key, group, name):
            self.deleted += 1
            self.log.info(
                "group %s: deleted consumer %s on %s (idle %s, nothing pending; its runner "
                "no longer beats)",
                group,
                name,
                key,
                idle,
            )


__all__ = ["DeadConsumers"]
