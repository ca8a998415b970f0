"""The alert rules and the Grafana dashboard in docs/ against the metrics the runner serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cortex_flow.runtime.metrics import build_registry, render
from cortex_flow.runtime.stats import AgentState, GroupStats, RunnerStats

DOCS = Path(__file__).resolve().parents[2] / "docs"
RULES = DOCS / "prometheus" / "alerts.yaml"
RULE_TESTS = DOCS / "prometheus" / "alerts.test.yaml"
GRAFANA = DOCS / "grafana" / "cortex-flow.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="no promtool: apt-get install -y prometheus"
)
NAME = re.compile(r"\bcortex_flow_[a-z_]+")


def _served() -> set[str]:
    """Every sample name /metrics renders when each kind of value has one."""
    stats = RunnerStats(runner="r1")
    group = stats.groups["g"] = GroupStats("g", "c")
    key = group.key("k")
    key.processed = 1
    key.latency.observe(0.1)
    group.redis_errors["timeout"] = 1
    stats.agents["a"] = AgentState("a", up=True, last_beat=1.0, timeout=5.0)
    stats.reload.last_outcome, stats.reload.last_at = "applied", 1.0
    stats.reload.totals["applied"] = 1
    for table in (stats.pending, stats.oldest_pending_age, stats.lag):
        table[("g", "k")] = 1
    stats.consumers[("g", "k", "c")] = 1
    stats.retention_held[("s", "k", "g")] = (1, 1.0)
    stats.trimmed["k"] = 1
    registry, collector = build_registry(stats)
    collector.refresh_success = True
    return set(re.findall(r"^(cortex_flow_[a-z_]+)", render(registry).decode(), re.M))


def test_rules_and_dashboard_name_only_metrics_the_runner_serves() -> None:
    """A renamed metric would silence an alert: every name used must be one /metrics has."""
    served = _served()
    rules = set(NAME.findall(RULES.read_text()))
    panels = set(NAME.findall(GRAFANA.read_text()))
    assert rules and panels
    assert rules - served == set()
    assert panels - served == set()
    expected = {
        "cortex_flow_agent_up",
        "cortex_flow_dead_lettered_total",
        "cortex_flow_oldest_pending_age_seconds",
        "cortex_flow_retention_held_seconds",
        "cortex_flow_last_reload_success",
        "cortex_flow_connected",
    }
    assert expected <= rules


def test_the_grafana_dashboard_covers_what_operators_watch() -> None:
    """One panel each for throughput, failures, pending age, lag, agents, reloads, retention."""
    doc = json.loads(GRAFANA.read_text())
    titles = " / ".join(p["title"] for p in doc["panels"]).lower()
    for word in ("throughput", "failures", "pending age", "lag", "agents", "reloads", "retention"):
        assert word in titles
    assert all(t["expr"] for p in doc["panels"] for t in p["targets"])


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    """`promtool check rules` finds the seven rules valid."""
    done = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


@needs_promtool
def test_the_rules_fire_as_their_unit_tests_say() -> None:
    """`promtool test rules`: each alert fires on its series, with its text, and not before."""
    done = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
