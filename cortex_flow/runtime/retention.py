"""The retention duty: trim every key of every stream with retention, never unread work.

Run by one runner at a time (:mod:`cortex_flow.runtime.duties`), every
``runner.retention_interval``. Each key is trimmed by one fenced script
(:func:`cortex_flow.wire.retention.trim`). A key a lagging group holds above its
``max_len`` is recorded in the hash ``<namespace>retention`` (field: the key; value:
JSON ``{stream, group, held, max_len, since}``), which ``status`` and every runner's
metrics read, and logged as a warning at most every :data:`WARN_EVERY` per key.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from cortex_flow.flow.durations import humanize
from cortex_flow.flow.topology import Resolved
from cortex_flow.runtime.stats import RunnerStats
from cortex_flow.wire.duties import Fence
from cortex_flow.wire.retention import Trimmed, trim

WARN_EVERY = 300.0  # a key held above its cap is logged at most this often


def held_key(resolved: Resolved) -> str:
    """The hash that records the keys held above their cap, and by which group."""
    return f"{resolved.namespace}retention"


async def read_held(client: Any, resolved: Resolved) -> dict[str, dict[str, Any]]:
    """The recorded holds by key (a malformed record is skipped)."""
    raw = await client.hgetall(held_key(resolved))
    out = {}
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        try:
            record = json.loads(value)
        except ValueError:
            continue
        if isinstance(record, dict):
            out[key] = record
    return out


class RetentionDuty:
    """Trims the declared streams; ``stats.trimmed`` counts what it removed, by key."""

    def __init__(self, client: Any, resolved: Resolved, stats: RunnerStats, log: logging.Logger):
        self.client = client
        self.resolved = resolved
        self.stats = stats
        self.log = log
        self._warned: dict[str, float] = {}

    def targets(self) -> list[tuple[str, str, int | None, float | None]]:
        """(stream, key, max_len, max_age) of every key to trim."""
        out = []
        for stream in self.resolved.streams.values():
            spec = stream.spec
            if spec.retained:
                out += [(stream.name, k.key, spec.max_len, spec.max_age) for k in stream.keys]
        return out

    async def run(self, fence: Fence) -> None:
        """One pass over every key; a failing key is logged and the pass goes on."""
        targets = self.targets()
        if not targets:
            return
        before = await read_held(self.client, self.resolved)
        held: dict[str, dict[str, Any]] = {}
        for stream, key, max_len, max_age in targets:
            result = await trim(self.client, fence, key, max_len=max_len, max_age=max_age)
            if result.trimmed:
                self.stats.trimmed[key] = self.stats.trimmed.get(key, 0) + result.trimmed
            if result.group is None:
                self._warned.pop(key, None)
                continue
            old = before.get(key)
            since = time.time()
            if old is not None and old.get("group") == result.group:
                since = float(old.get("since") or since)
            held[key] = {
                "stream": stream,
                "group": result.group,
                "held": result.held,
                "max_len": max_len,
                "floor": result.floor,
                "since": round(since, 3),
            }
            self._warn(stream, result, max_len, since)
        pipe = self.client.pipeline(transaction=False)
        gone = [key for key in before if key not in held]
        if gone:
            pipe.hdel(held_key(self.resolved), *gone)
        if held:
            pipe.hset(held_key(self.resolved), mapping={k: json.dumps(v) for k, v in held.items()})
        if gone or held:
            await pipe.execute()

    def _warn(self, stream: str, result: Trimmed, max_len: int | None, since: float) -> None:
        now = time.monotonic()
        last = self._warned.get(result.key)
        if last is not None and now - last < WARN_EVERY:
            return
        self._warned[result.key] = now
        self.log.warning(
            "retention: group %s holds %s (stream %s) %d entries above its max_len %s "
            "for %s: they are unread or pending in that group, so they are kept. Give the "
            "group more consumers; if no flow declares it any more, `cortex-flow prune %s` "
            "removes it (logged every %s)",
            result.group,
            result.key,
            stream,
            result.held,
            max_len,
            humanize(max(0.0, time.time() - since)),
            result.group,
            humanize(WARN_EVERY),
        )


__all__ = ["RetentionDuty", "held_key", "read_held"]
