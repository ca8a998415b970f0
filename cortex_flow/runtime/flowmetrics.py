"""Metrics of flow control (``rate_limit``, ``max_in_flight``, ``dedup``), per group."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cortex_flow.runtime.stats import RunnerStats


def flow_detail(stats: RunnerStats) -> dict[str, dict[str, float]]:
    """Per flow-controlled group, for ``/readyz`` (and so ``status``): messages held back
    now, seconds waited for rate tokens, duplicates acknowledged unhandled."""
    return {
        group.group: {
            "waiting": group.flow.waiting,
            "rate_wait_seconds": round(group.flow.rate_waits, 3),
            "duplicates": group.flow.duplicates,
        }
        for group in stats.groups.values()
        if group.flow is not None
    }


def flow_metrics(stats: RunnerStats) -> Iterator[Metric]:
    """``cortex_flow_flow_waiting``, ``cortex_flow_rate_limit_wait_seconds_total`` and
    ``cortex_flow_dedup_duplicates_total`` of the groups that declare flow control."""
    waiting = GaugeMetricFamily(
        "cortex_flow_flow_waiting",
        "Messages held back now by rate_limit, max_in_flight or a dedup copy being handled "
        "(they keep their leases: not failed, retried or claimed).",
        labels=["group"],
    )
    waits = CounterMetricFamily(
        "cortex_flow_rate_limit_wait_seconds",
        "Seconds messages spent waiting for rate_limit tokens, summed over messages.",
        labels=["group"],
    )
    dupes = CounterMetricFamily(
        "cortex_flow_dedup_duplicates",
        "Messages acknowledged without running their routes: their dedup key was handled.",
        labels=["group"],
    )
    for group in stats.groups.values():
        flow = group.flow
        if flow is not None:
            waiting.add_metric([group.group], float(flow.waiting))
            waits.add_metric([group.group], flow.rate_waits)
            dupes.add_metric([group.group], float(flow.duplicates))
    yield waiting
    yield waits
    yield dupes
