"""Plain counters the hot path bumps without locks; exported by :mod:`cortex_flow.runtime.metrics`.

The consumer loop runs on one event loop thread, so ints suffice. Prometheus
reads these at scrape time through a custom collector instead of the hot path
paying for prometheus-client's locked counters on every message.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Any

HISTORY = 50  # reloads remembered for the dashboard

# handler latency histogram buckets, seconds
BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass
class Latency:
    """A cumulative-on-export histogram: counts per bucket, plus sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def observe_many(self, seconds: float, count: int) -> None:
        """Observe ``count`` messages that took ``seconds`` each (a batch's mean)."""
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += count
        self.total += seconds * count
        self.count += count


@dataclass
class KeyStats:
    """Counters of one group on one source key."""

    processed: int = 0  # acknowledged after a successful route (including drop)
    failed: int = 0  # a route raised (a retry follows, or the last try was dead-lettered)
    retried: int = 0  # deliveries after the first
    dead_lettered: int = 0
    unmatched: int = 0  # no route matched
    claimed: int = 0  # taken over from another consumer
    stuck: int = 0  # failed for good with no dead_letter: left pending, no longer retried
    expired: int = 0  # read past its deadline: not handled
    canceled: int = 0  # canceled: acknowledged without its routes, or its result discarded
    latency: Latency = field(default_factory=Latency)


@dataclass
class FlowStats:
    """What the gate of one group shows (status, metrics)."""

    waiting: int = 0  # entries held back now (rate, slots or a dedup copy)
    rate_waits: float = 0.0  # seconds entries spent waiting for rate tokens, summed
    duplicates: int = 0  # acknowledged unhandled: their dedup key was already handled


@dataclass
class GroupStats:
    """Counters of one consumer group, per source key."""

    group: str
    consumer: str
    keys: dict[str, KeyStats] = field(default_factory=dict)
    # passing Redis errors met (out of memory, read-only, no answer, ...), by reason
    redis_errors: dict[str, int] = field(default_factory=dict)
    # what Redis refuses that retrying soon will not fix (ACL, credentials, TLS, DNS), by
    # area ("blocked": reads; "recovery": claims of idle entries; "commit"), in one line
    problems: dict[str, str] = field(default_factory=dict)
    overrunning: int = 0  # sync calls past their timeout whose thread still runs
    held_back: bool = False  # max_stuck_calls of them: no new message starts
    max_stuck_calls: int = 0  # the group's bound (0: no sync call)
    leases_lost: int = 0  # held entries another consumer took over before a renewal
    flow: FlowStats | None = None  # rate_limit, max_in_flight, dedup (runtime/flowgate.py)

    def key(self, key: str) -> KeyStats:
        stats = self.keys.get(key)
        if stats is None:
            stats = self.keys[key] = KeyStats()
        return stats


@dataclass
class AgentState:
    """What the heartbeat monitor knows of one agent."""

    name: str
    up: bool | None = None  # None: never seen since the runner started
    last_beat: float | None = None  # epoch seconds of the last heartbeat
    timeout: float = 0.0


@dataclass
class ReloadState:
    """The last reload and totals by outcome (applied / rejected / rolled_back)."""

    last_outcome: str | None = None
    last_at: float | None = None
    last_errors: list[str] = field(default_factory=list)
    last_changes: list[str] = field(default_factory=list)
    last_duration: float = 0.0
    totals: dict[str, int] = field(default_factory=dict)
    # the newest reloads, oldest first: {"outcome", "at", "reason", "changes", "errors"}
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))


@dataclass
class RunnerStats:
    """Everything the admin endpoint and status show about a running runner."""

    runner: str
    started_at: float = 0.0
    connected: bool = False
    provisioned: bool = False
    draining: bool = False
    groups: dict[str, GroupStats] = field(default_factory=dict)
    agents: dict[str, AgentState] = field(default_factory=dict)
    reload: ReloadState = field(default_factory=ReloadState)
    # gauges refreshed from Redis before each scrape: (group, key) -> value
    pending: dict[tuple[str, str], int] = field(default_factory=dict)
    oldest_pending_age: dict[tuple[str, str], float] = field(default_factory=dict)
    lag: dict[tuple[str, str], int] = field(default_factory=dict)
    consumers: dict[tuple[str, str, str], int] = field(default_factory=dict)  # pending by consumer
    # keys held above their max_len: (stream, key, group) -> (entries held, since epoch s)
    retention_held: dict[tuple[str, str, str], tuple[int, float]] = field(default_factory=dict)
    trimmed: dict[str, int] = field(default_factory=dict)  # entries this runner trimmed, by key
