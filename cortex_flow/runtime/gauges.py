"""The runner's Redis-derived gauges (pending, oldest pending age, lag), read per scrape."""

from __future__ import annotations

import logging
import time
from typing import Any

from cortex_flow.flow.topology import Resolved
from cortex_flow.runtime.retention import read_held
from cortex_flow.runtime.stats import RunnerStats
from cortex_flow.wire.entryids import id_ms
from cortex_flow.wire.lag import METRICS_CAP, group_lags

log = logging.getLogger("cortex_flow.runner")


async def refresh_gauges(client: Any, resolved: Resolved | None, stats: RunnerStats) -> None:
    """Update pending/lag gauges from Redis (before a metrics scrape).

    One pipeline for every group and key: XPENDING per group and key, XINFO GROUPS and
    the newest entry (XREVRANGE COUNT 1) per key; lag as :func:`group_lags` decides it
    (never the server's counter alone: it can be wrong after a failover). A command
    that fails (a key deleted under us, ...) leaves its gauges as they were; a pipeline
    that cannot run at all raises, and the scrape says so.
    """
    if resolved is None:
        return
    pairs = [(g.name, k.key) for g in resolved.groups.values() for k in g.keys]
    keys = sorted({key for _, key in pairs})
    pipe = client.pipeline(transaction=False)
    for group, key in pairs:
        pipe.xpending(key, group)
    for key in keys:
        pipe.xinfo_groups(key)
        pipe.xrevrange(key, count=1)
    replies = await pipe.execute(raise_on_error=False)
    _prune_gauges(stats, set(pairs))
    now_ms = time.time() * 1000
    for (group, key), summary in zip(pairs, replies[: len(pairs)], strict=True):
        if isinstance(summary, BaseException):
            log.debug("metrics: XPENDING %s %s failed (%s); gauges kept", key, group, summary)
            continue
        _pending_gauges(stats, group, key, summary, now_ms)
    wanted = {key: {g for g, k in pairs if k == key} for key in keys}
    per_key = replies[len(pairs) :]
    newest: dict[str, str | None] = {}
    found: list[tuple[str, str, Any]] = []
    readers: list[tuple[str, str, str]] = []  # (group, key, last-delivered)
    for i, key in enumerate(keys):
        infos, last = per_key[2 * i], per_key[2 * i + 1]
        if isinstance(infos, BaseException):
            log.debug("metrics: XINFO GROUPS %s failed (%s); lag kept", key, infos)
            continue
        if not isinstance(last, BaseException):
            newest[key] = str(last[0][0]) if last else None
        for info in infos:
            name = info.get("name")
            if name not in wanted[key]:
                continue
            delivered = str(info["last-delivered-id"])
            found.append((key, delivered, info.get("lag")))
            readers.append((name, key, delivered))
    lags = await group_lags(client, found, newest, METRICS_CAP)
    for group, key, delivered in readers:
        lag = lags[(key, delivered)]
        if lag is None:
            stats.lag.pop((group, key), None)  # past the cap, none reported: unknown
        else:
            stats.lag[(group, key)] = lag
    await _retention_gauges(client, resolved, stats)


async def _retention_gauges(client: Any, resolved: Resolved, stats: RunnerStats) -> None:
    """Keys held above their cap, as the retention duty (in whichever runner) recorded."""
    try:
        held = await read_held(client, resolved)
    except Exception as exc:  # the scrape still shows the other gauges
        log.debug("metrics: reading the retention record failed (%s); kept", exc)
        return
    stats.retention_held = {
        (str(r.get("stream")), key, str(r.get("group"))): (
            int(r.get("held") or 0),
            float(r.get("since") or 0.0),
        )
        for key, r in held.items()
    }


def _pending_gauges(stats: RunnerStats, group: str, key: str, summary: Any, now_ms: float) -> None:
    stats.pending[(group, key)] = int(summary["pending"])
    oldest = summary.get("min")
    age = (now_ms - id_ms(str(oldest))) / 1000 if oldest else 0.0
    stats.oldest_pending_age[(group, key)] = max(age, 0.0)
    listed = {c["name"]: int(c["pending"]) for c in summary.get("consumers") or []}
    for gauge in [g for g in stats.consumers if g[:2] == (group, key)]:
        if gauge[2] not in listed:
            stats.consumers[gauge] = 0  # XPENDING lists consumers with entries only
    for consumer, count in listed.items():
        stats.consumers[(group, key, consumer)] = count


def _prune_gauges(stats: RunnerStats, current: set[tuple[str, str]]) -> None:
    """Forget the gauges of groups and keys no longer in the topology."""
    for gauges in (stats.pending, stats.oldest_pending_age, stats.lag):
        for gone in [pair for pair in gauges if pair not in current]:
            del gauges[gone]
    for consumer in [c for c in stats.consumers if c[:2] not in current]:
        del stats.consumers[consumer]
