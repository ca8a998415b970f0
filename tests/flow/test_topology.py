"""Resolving flows into concrete Redis keys, groups and consumers."""

from __future__ import annotations

import textwrap
from pathlib import Path

from cortex_flow.flow.loader import load_topology
from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.topology import StreamKey, expand, key_variables, render_key, resolve

AGENTS = ["harold", "planner", "worker"]


def stream(key: str, **extra: object) -> StreamSpec:
    return StreamSpec.model_validate({"key": key, **extra})


def test_literal_key_is_one_key() -> None:
    """A key without variables is exactly one key, with nothing to bind."""
    keys, dynamic = expand(stream("cortex:tasks:dlq"), "dlq", AGENTS, {})
    assert keys == (StreamKey("dlq", "cortex:tasks:dlq"),)
    assert not dynamic


def test_priority_keys_expand_in_priority_order() -> None:
    """{{ priority }} expands over the levels in the order declared, highest first."""
    spec = stream("cortex:tasks:{{ priority }}", priorities=["critical", "high", "normal", "low"])
    keys, _ = expand(spec, "tasks", AGENTS, {})
    assert [(k.key, k.priority) for k in keys] == [
        ("cortex:tasks:critical", "critical"),
        ("cortex:tasks:high", "high"),
        ("cortex:tasks:normal", "normal"),
        ("cortex:tasks:low", "low"),
    ]


def test_priority_order_is_the_declared_order_not_alphabetical() -> None:
    """Levels keep their declared order whatever their names."""
    spec = stream("q:{{ priority }}", priorities=["zeta", "alpha", "mid"])
    keys, _ = expand(spec, "q", [], {})
    assert [k.priority for k in keys] == ["zeta", "alpha", "mid"]


def test_agent_keys_expand_over_declared_agents() -> None:
    """{{ agent }} gives one key per declared agent."""
    keys, dynamic = expand(stream("cortex:messages:{{ agent }}"), "inbox", AGENTS, {})
    assert [(k.key, k.agent) for k in keys] == [
        ("cortex:messages:harold", "harold"),
        ("cortex:messages:planner", "planner"),
        ("cortex:messages:worker", "worker"),
    ]
    assert not dynamic


def test_bound_variable_gives_one_key() -> None:
    """A group's vars fix a variable: the group reads one key."""
    keys, _ = expand(stream("cortex:messages:{{ agent }}"), "inbox", AGENTS, {"agent": "harold"})
    assert keys == (StreamKey("inbox", "cortex:messages:harold", None, "harold"),)


def test_priority_and_agent_together_expand_as_a_product() -> None:
    """Both variables expand: priority first, then agent within each level."""
    spec = stream("w:{{ agent }}:{{ priority }}", priorities=["high", "low"])
    keys, _ = expand(spec, "w", ["a", "b"], {})
    assert [k.key for k in keys] == ["w:a:high", "w:b:high", "w:a:low", "w:b:low"]


def test_other_variables_make_the_stream_dynamic() -> None:
    """A variable only a message can bind leaves no known keys."""
    keys, dynamic = expand(stream("t:{{ tenant }}"), "t", AGENTS, {})
    assert (keys, dynamic) == ((), True)
    keys, dynamic = expand(stream("t:{{ tenant }}"), "t", AGENTS, {"tenant": "acme"})
    assert [k.key for k in keys] == ["t:acme"]
    assert not dynamic


def test_key_variables_and_render_key() -> None:
    """A key's variables are known without rendering, and render from plain values."""
    spec = stream("{cortex}:{{ agent }}:{{ priority }}", priorities=["high"])
    assert key_variables(spec) == {"agent", "priority"}
    assert render_key(spec, {"agent": "harold", "priority": "high"}) == "{cortex}:harold:high"
    assert render_key(stream("fixed"), {}) == "fixed"


def _topology(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flows.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_resolve_groups_keys_consumers_and_dead_letters(tmp_path: Path) -> None:
    """resolve() gives every group its keys in order, its consumer name and its DLQ key."""
    path = _topology(
        tmp_path,
        """\
        version: 1
        streams:
          tasks: {key: "t:{{ priority }}", priorities: [high, low]}
          inbox: {key: "m:{{ agent }}"}
          dlq: {key: t:dlq}
          hb: {key: hb}
        agents: {b: {}, a: {}}
        heartbeats: {stream: hb}
        groups:
          work:
            stream: tasks
            dead_letter: dlq
            routes: [{to: inbox, vars: {agent: "{{ msg.to }}"}}]
          a:
            stream: inbox
            vars: {agent: a}
            routes: [{drop: true}]
        """,
    )
    resolved = resolve(load_topology([path]), "runner-1")
    assert [k.key for k in resolved.groups["work"].keys] == ["t:high", "t:low"]
    assert [k.key for k in resolved.groups["a"].keys] == ["m:a"]
    assert resolved.groups["work"].dead_letter == "t:dlq"
    assert resolved.groups["a"].dead_letter is None
    assert resolved.groups["work"].consumer == "runner-1"
    assert resolved.heartbeat_key == "hb"
    assert set(resolved.keys()) == {"t:high", "t:low", "m:a", "m:b", "t:dlq", "hb"}
    assert [k.agent for k in resolved.streams["inbox"].keys] == ["a", "b"]


def test_fingerprint_is_stable_and_follows_the_spec(tmp_path: Path) -> None:
    """Equal flows give equal fingerprints; a changed setting changes it."""
    text = """\
        version: 1
        streams: {s: {key: s}}
        groups:
          g: {stream: s, concurrency: 2, routes: [{drop: true}]}
        """
    first = resolve(load_topology([_topology(tmp_path, text)]), "r").groups["g"]
    again = resolve(load_topology([_topology(tmp_path, text)]), "r").groups["g"]
    changed = resolve(
        load_topology([_topology(tmp_path, text.replace("concurrency: 2", "concurrency: 3"))]),
        "r",
    ).groups["g"]
    assert first.fingerprint() == again.fingerprint()
    assert first.fingerprint() != changed.fingerprint()


def _streams(tmp_path: Path, *keys: str) -> str:
    lines = "".join(
        f'  s{n}: {{key: "{key}"{", priorities: [a]" if "{{" in key else ""}}}\n'
        for n, key in enumerate(keys)
    )
    path = tmp_path / "flows.yaml"
    path.write_text(f"version: 1\nstreams:\n{lines}")
    return resolve(load_topology([path]), "r").namespace


def test_the_namespace_is_the_prefix_the_stream_keys_share(tmp_path: Path) -> None:
    """Runner and duty keys live under the keys' common prefix, cut after its last colon;
    under ``cortex-flow:`` when the keys share none."""
    assert _streams(tmp_path, "cortex:tasks:{{ priority }}", "cortex:events") == "cortex:"
    assert _streams(tmp_path, "app:t1:x", "app:t1:y", "app:t2:z") == "app:"
    assert _streams(tmp_path, "tasks", "events") == "cortex-flow:"
    assert _streams(tmp_path, "{cf}:tasks", "{cf}:dlq") == "{cf}:"


def test_runner_and_duty_keys(tmp_path: Path) -> None:
    """Runners beat on <namespace>runners without a heartbeat stream; every duty's lease
    shares one hash tag (the namespace's own, when it has one)."""
    path = tmp_path / "flows.yaml"
    path.write_text('version: 1\nstreams: {tasks: {key: "app:tasks"}}\n')
    resolved = resolve(load_topology([path]), "r")
    assert resolved.runner_key == "app:runners"
    assert resolved.duty_key("retention") == "app:{duty}:retention"
    path.write_text('version: 1\nstreams: {tasks: {key: "{app}:tasks"}}\n')
    assert resolve(load_topology([path]), "r").duty_key("agents") == "{app}:duty:agents"
