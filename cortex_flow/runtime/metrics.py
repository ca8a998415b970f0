"""Prometheus exposition of :class:`~cortex_flow.runtime.stats.RunnerStats`, built at scrape time.

The hot path bumps plain ints in :mod:`cortex_flow.runtime.stats`; this collector turns
them into metric families only when ``/metrics`` is scraped. Each runner gets a
registry of its own (:func:`build_registry`), never prometheus-client's global
one, so two runners in one process (tests, embedded use) never collide.

Scrapes run on the event loop that bumps the counters, so a scrape sees one
consistent moment and needs no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from cortex_flow.runtime.flowmetrics import flow_metrics
from cortex_flow.runtime.stats import BUCKETS, KeyStats, Latency, RunnerStats
from cortex_flow.version import __version__

__all__ = ["CONTENT_TYPE", "SUCCESSFUL_RELOADS", "RunnerCollector", "build_registry", "render"]

# what generate_latest writes: the classic Prometheus text format
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# reload outcomes after which the running topology is the one on disk
SUCCESSFUL_RELOADS = frozenset({"applied", "unchanged"})

KEY_LABELS = ("group", "stream", "consumer")
PAIR_LABELS = ("group", "stream")

# (metric name without _total, KeyStats attribute, help text)
KEY_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("processed", "processed", "Messages acknowledged after a successful route (drops included)."),
    (
        "failed",
        "failed",
        "Route attempts that raised, the last one of a message (dead-lettered) included.",
    ),
    ("retried", "retried", "Deliveries after the first."),
    ("dead_lettered", "dead_lettered", "Messages moved to the dead-letter stream."),
    ("unmatched", "unmatched", "Messages no route matched."),
    ("claimed", "claimed", "Entries taken over from another consumer."),
    ("expired", "expired", "Messages read after their deadline (ttl): not handled."),
    ("canceled", "canceled", "Messages canceled: skipped, or their result discarded."),
)


def cumulative_buckets(latency: Latency) -> list[tuple[str, float]]:
    """Per-bucket counts as Prometheus ``le`` buckets: cumulative, ending with ``+Inf``."""
    # repr matches prometheus-client's own ``le`` spelling ("0.0005", "1.0") for these bounds
    bounds = [repr(float(bound)) for bound in BUCKETS] + ["+Inf"]
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, latency.counts, strict=True):
        running += count
        buckets.append((bound, float(running)))
    return buckets


def _flag(value: bool) -> float:
    return 1.0 if value else 0.0


class RunnerCollector:
    """A custom collector that reads a :class:`RunnerStats` at scrape time.

    ``refresh_success`` is set by the admin endpoint after it tried to update the
    Redis-derived gauges (pending, lag, …); ``None`` until the first attempt.
    ``clock`` gives epoch seconds, replaceable in tests.
    """

    def __init__(self, stats: RunnerStats, *, clock: Callable[[], float] = time.time) -> None:
        self.stats = stats
        self.clock = clock
        self.refresh_success: bool | None = None

    def collect(self) -> Iterator[Metric]:
        yield from self._runner()
        yield from self._keys()
        yield from self._gauges()
        yield from self._agents()
        yield from self._groups()
        yield from self._reloads()

    def _runner(self) -> Iterator[Metric]:
        stats = self.stats
        info = InfoMetricFamily("cortex_flow_runner", "The runner's name and cortex-flow version.")
        info.add_metric([], {"runner": stats.runner, "version": __version__})
        yield info
        flags = (
            ("up", True, "1 while the runner process serves this endpoint."),
            ("connected", stats.connected, "1 while Redis answers."),
            ("provisioned", stats.provisioned, "1 once streams and groups exist in Redis."),
            ("draining", stats.draining, "1 while the runner finishes in-flight work to stop."),
        )
        for name, value, doc in flags:
            yield GaugeMetricFamily(f"cortex_flow_{name}", doc, value=_flag(value))
        yield GaugeMetricFamily(
            "cortex_flow_start_time_seconds",
            "When the runner started, in seconds since the epoch.",
            value=stats.started_at,
        )
        if self.refresh_success is not None:
            yield GaugeMetricFamily(
                "cortex_flow_refresh_success",
                "0 when the last scrape could not read pending/lag from Redis (values are stale).",
                value=_flag(self.refresh_success),
            )

    def _keys(self) -> Iterator[Metric]:
        rows: list[tuple[list[str], KeyStats]] = [
            ([group.group, key, group.consumer], key_stats)
            for group in self.stats.groups.values()
            for key, key_stats in group.keys.items()
        ]
        for name, attribute, doc in KEY_COUNTERS:
            counter = CounterMetricFamily(f"cortex_flow_{name}", doc, labels=KEY_LABELS)
            for labels, key_stats in rows:
                counter.add_metric(labels, float(getattr(key_stats, attribute)))
            yield counter
        histogram = HistogramMetricFamily(
            "cortex_flow_handler_seconds",
            "Time from taking a message to finishing its routes (inline tables without "
            "templates: each message of a batch counts the batch's mean).",
            labels=KEY_LABELS,
        )
        for labels, key_stats in rows:
            latency = key_stats.latency
            histogram.add_metric(labels, cumulative_buckets(latency), latency.total)
        yield histogram

    def _gauges(self) -> Iterator[Metric]:
        stats = self.stats
        pairs: tuple[
            tuple[str, str, dict[tuple[str, str], int] | dict[tuple[str, str], float]], ...
        ]
        pairs = (
            (
                "cortex_flow_pending",
                "Entries delivered to the group, not yet acknowledged.",
                stats.pending,
            ),
            (
                "cortex_flow_oldest_pending_age_seconds",
                "Idle time of the group's oldest pending entry.",
                stats.oldest_pending_age,
            ),
            ("cortex_flow_lag", "Entries in the stream not yet delivered to the group.", stats.lag),
        )
        for name, doc, values in pairs:
            gauge = GaugeMetricFamily(name, doc, labels=PAIR_LABELS)
            for (group, key), value in values.items():
                gauge.add_metric([group, key], float(value))
            yield gauge
        consumers = GaugeMetricFamily(
            "cortex_flow_consumer_pending",
            "Pending entries held by each consumer of the group.",
            labels=KEY_LABELS,
        )
        for (group, key, consumer), count in stats.consumers.items():
            consumers.add_metric([group, key, consumer], float(count))
        yield consumers
        yield from self._retention()

    def _retention(self) -> Iterator[Metric]:
        labels = ["stream", "key", "group"]
        held = GaugeMetricFamily(
            "cortex_flow_retention_held",
            "Entries a lagging group holds above the key's retention.max_len (unread or "
            "pending in that group, so never trimmed).",
            labels=labels,
        )
        since = GaugeMetricFamily(
            "cortex_flow_retention_held_seconds",
            "How long the group has held the key above its retention.max_len.",
            labels=labels,
        )
        now = self.clock()
        for (stream, key, group), (count, start) in self.stats.retention_held.items():
            held.add_metric([stream, key, group], float(count))
            since.add_metric([stream, key, group], max(0.0, now - start))
        trimmed = CounterMetricFamily(
            "cortex_flow_retention_trimmed",
            "Entries this runner's retention passes trimmed (read and acknowledged by every "
            "group, past max_len or max_age).",
            labels=["key"],
        )
        for key, count in self.stats.trimmed.items():
            trimmed.add_metric([key], float(count))
        yield held
        yield since
        yield trimmed

    def _groups(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "cortex_flow_redis_errors",
            "Passing Redis errors met (oom, readonly, loading, failover, busy, unreachable, "
            "...): the work was kept and tried again, nothing failed or was dead-lettered.",
            labels=["group", "reason"],
        )
        overrunning = GaugeMetricFamily(
            "cortex_flow_calls_overrunning",
            "Sync calls past their timeout whose thread still runs (the message waits).",
            labels=["group"],
        )
        held_back = GaugeMetricFamily(
            "cortex_flow_group_held_back",
            "1 while max_stuck_calls sync calls of the group are stuck past their timeout: "
            "it starts no new message until one returns (other groups go on).",
            labels=["group"],
        )
        lost = CounterMetricFamily(
            "cortex_flow_leases_lost",
            "Held entries another consumer took over before this one renewed their lease.",
            labels=["group"],
        )
        for group in self.stats.groups.values():
            for reason, count in sorted(group.redis_errors.items()):
                errors.add_metric([group.group, reason], float(count))
            overrunning.add_metric([group.group], float(group.overrunning))
            held_back.add_metric([group.group], float(group.held_back))
            lost.add_metric([group.group], float(group.leases_lost))
        yield errors
        yield overrunning
        yield held_back
        yield lost
        yield from flow_metrics(self.stats)

    def _agents(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "cortex_flow_agent_up",
            "1 while the agent's heartbeats arrive in time; 0 when late or never seen.",
            labels=["agent"],
        )
        age = GaugeMetricFamily(
            "cortex_flow_agent_heartbeat_age_seconds",
            "Seconds since the agent's last heartbeat.",
            labels=["agent"],
        )
        timeout = GaugeMetricFamily(
            "cortex_flow_agent_heartbeat_timeout_seconds",
            "Silence after which the agent is marked down.",
            labels=["agent"],
        )
        now = self.clock()
        for agent in self.stats.agents.values():
            # a declared agent never seen since start is not up: 0, so an alert on
            # `cortex_flow_agent_up == 0` fires for an agent that never started
            up.add_metric([agent.name], _flag(bool(agent.up)))
            if agent.last_beat is not None:
                age.add_metric([agent.name], max(0.0, now - agent.last_beat))
            timeout.add_metric([agent.name], agent.timeout)
        yield up
        yield age
        yield timeout

    def _reloads(self) -> Iterator[Metric]:
        reload = self.stats.reload
        totals = CounterMetricFamily(
            "cortex_flow_reloads", "Reloads by outcome.", labels=["outcome"]
        )
        for outcome, count in sorted(reload.totals.items()):
            totals.add_metric([outcome], float(count))
        yield totals
        # the topology loaded at start counts as a success until a reload says otherwise
        success = reload.last_outcome is None or reload.last_outcome in SUCCESSFUL_RELOADS
        yield GaugeMetricFamily(
            "cortex_flow_last_reload_success",
            "1 when the last reload left the files on disk running; 0 when it was refused.",
            value=_flag(success),
        )
        yield GaugeMetricFamily(
            "cortex_flow_last_reload_errors",
            "Problems reported by the last reload.",
            value=float(len(reload.last_errors)),
        )
        if reload.last_at is not None:
            yield GaugeMetricFamily(
                "cortex_flow_last_reload_timestamp_seconds",
                "When the last reload finished, in seconds since the epoch.",
                value=reload.last_at,
            )
            yield GaugeMetricFamily(
                "cortex_flow_last_reload_duration_seconds",
                "How long the last reload took.",
                value=reload.last_duration,
            )


def build_registry(stats: RunnerStats) -> tuple[CollectorRegistry, RunnerCollector]:
    """A fresh registry holding one :class:`RunnerCollector` over ``stats``."""
    registry = CollectorRegistry(auto_describe=False)
    collector = RunnerCollector(stats)
    registry.register(collector)
    return registry, collector


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (serve with :data:`CONTENT_TYPE`)."""
    return generate_latest(registry)
