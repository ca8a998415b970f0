"""Validation of rate_limit, max_in_flight and dedup: one line each with file:line:col."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cortex_flow.cli.main import cli
from cortex_flow.flow.flowcontrol import flow_limits, retry_span
from cortex_flow.flow.models import GroupSpec, RetryPolicy
from cortex_flow.flow.rates import per_second

STREAMS = 'version: 1\nstreams:\n  tasks: {key: "cortex:tasks"}\n'


def _problems(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str) -> list[str]:
    (tmp_path / "flows").mkdir()
    (tmp_path / "config.yaml").write_text("flows: flows/\n")
    (tmp_path / "flows" / "streams.yaml").write_text(STREAMS)
    groups = "version: 1\ngroups:\n  g:\n" + textwrap.indent(textwrap.dedent(body), "    ")
    (tmp_path / "flows" / "groups.yaml").write_text(groups)
    code = cli("validate", "--config", str(tmp_path / "config.yaml"))
    out = capsys.readouterr().out
    assert code == 1, out
    return out.splitlines()[:-1]


def test_a_malformed_rate_names_the_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`60/minute` is refused at its place with the forms that work."""
    monkeypatch.chdir(tmp_path)
    lines = _problems(
        tmp_path, capsys, "stream: tasks\nrate_limit: {rate: 60/minute}\nroutes: [{drop: true}]\n"
    )
    assert lines == [
        'flows/groups.yaml:5:24: groups.g.rate_limit.rate: "60/minute" is not a rate; write a '
        "count, a slash and a unit (s, m or h), such as 20/s, 60/m or 1000/h"
    ]


def test_a_key_template_with_an_unknown_name_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dedup and a rate key may use msg, id, stream, group, priority, agent and vars."""
    monkeypatch.chdir(tmp_path)
    body = (
        "stream: tasks\n"
        'rate_limit: {rate: 20/s, key: "{{ mesg.tenant }}"}\n'
        'dedup: {key: "{{ msg.id }}{{ tenant }}", window: 1h}\n'
        "routes: [{drop: true}]\n"
    )
    lines = _problems(tmp_path, capsys, body)
    assert lines[0].startswith("flows/groups.yaml:5:35: groups.g.rate_limit.key: template uses ")
    assert 'unknown name "mesg"; did you mean "msg"?' in lines[0]
    assert lines[1].startswith("flows/groups.yaml:6:18: groups.g.dedup.key: template uses ")
    assert 'unknown name "tenant"' in lines[1] and len(lines) == 2


def test_a_dedup_window_shorter_than_the_retry_span_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy arriving while the first is still retried would run again."""
    monkeypatch.chdir(tmp_path)
    body = 'stream: tasks\ndedup: {key: "{{ msg.id }}", window: 30s}\nroutes: [{drop: true}]\n'
    assert _problems(tmp_path, capsys, body) == [
        "flows/groups.yaml:5:42: groups.g.dedup.window: window (30s) is shorter than the retry "
        "span (1m15s: the backoffs of 5 deliveries plus claim_idle), so a copy arriving while "
        "the first is retried would run again; raise window to at least 1m15s"
    ]


def test_max_in_flight_must_be_at_least_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    lines = _problems(tmp_path, capsys, "stream: tasks\nmax_in_flight: 0\nroutes: [{drop: true}]\n")
    assert len(lines) == 1 and "groups.g.max_in_flight" in lines[0] and ":5:" in lines[0]


def test_rates_spans_and_the_graph_label() -> None:
    """60/m is one a second; the retry span sums the backoffs; graph shows the limits."""
    assert per_second("60/m") == 1.0 and per_second("7200/h") == 2.0
    policy = RetryPolicy.model_validate(
        {"max_deliveries": 4, "backoff": {"initial": "1s", "max": "3s"}}
    )
    assert retry_span(policy) == 1 + 2 + 3
    spec = GroupSpec.model_validate(
        {
            "stream": "tasks",
            "routes": [{"drop": True}],
            "rate_limit": {"rate": "60/m", "burst": 10, "key": "{{ msg.tenant }}"},
            "max_in_flight": 5,
            "dedup": {"key": "{{ msg.id }}", "window": "10m"},
        }
    )
    assert flow_limits(spec) == (
        "rate 60/m burst 10 per {{ msg.tenant }}, max 5 in flight, dedup {{ msg.id }} for 10m"
    )


def test_graph_shows_a_group_s_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`graph` puts the rate, the in-flight cap and the dedup key in the group's node."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flows").mkdir()
    (tmp_path / "config.yaml").write_text("flows: flows/\n")
    (tmp_path / "flows" / "main.yaml").write_text(
        STREAMS
        + "groups:\n  g:\n    stream: tasks\n    rate_limit: {rate: 20/s}\n"
        + "    max_in_flight: 2\n    routes: [{drop: true}]\n"
    )
    assert cli("graph") == 0
    assert "x64, rate 20/s, max 2 in flight" in capsys.readouterr().out


def test_flow_control_on_a_partitioned_stream_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partitioned group's consumers have no gate yet: saying so beats ignoring it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flows").mkdir()
    (tmp_path / "config.yaml").write_text("flows: flows/\n")
    (tmp_path / "flows" / "main.yaml").write_text(
        "version: 1\nstreams:\n"
        '  tasks: {key: "cortex:tasks:{{ partition }}", partitions: 3}\n'
        "groups:\n  g:\n    stream: tasks\n    max_in_flight: 2\n    routes: [{drop: true}]\n"
    )
    assert cli("validate") == 1
    assert (
        "flows/main.yaml:7:5: groups.g.max_in_flight: max_in_flight does not apply to a "
        "group on a partitioned stream yet; remove it, or read a stream without partitions"
    ) in capsys.readouterr().out
