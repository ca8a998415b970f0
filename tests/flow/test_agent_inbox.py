"""``agents.X.inbox``: the group an agent's own client reads, checked and resolved."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cortex_flow.errors import ValidationFailed
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.plan import diff
from cortex_flow.flow.topology import resolve

STREAMS = """\
version: 1
streams:
  tasks: {key: "t:{{ priority }}", priorities: [high, low]}
  inbox: {key: "m:{{ agent }}"}
  dlq: {key: dlq}
"""


def write(tmp_path: Path, agents: str, groups: str = "") -> Path:
    (tmp_path / "flows").mkdir(exist_ok=True)
    (tmp_path / "flows" / "streams.yaml").write_text(STREAMS)
    text = "version: 1\nagents:\n" + textwrap.indent(textwrap.dedent(agents), "  ")
    if groups:
        text += "groups:\n" + textwrap.indent(textwrap.dedent(groups), "  ")
    (tmp_path / "flows" / "agents.yaml").write_text(text)
    (tmp_path / "config.yaml").write_text("flows: flows/\n")
    return tmp_path / "config.yaml"


def test_an_inbox_resolves_to_a_group_the_runner_does_not_read(tmp_path: Path) -> None:
    """The client's group is on the agent's key with the declared policy; the plan of a
    fresh start creates it and says an agent's client reads it."""
    config = write(
        tmp_path,
        """\
        planner:
          inbox: {retry: {max_deliveries: 2}, dead_letter: dlq}
        scout:
          inbox: {group: scouts, start: latest}
        """,
    )
    resolved = resolve(load_project(config).topology, "runner-1")
    planner, scouts = resolved.groups["planner"], resolved.groups["scouts"]
    assert ([k.key for k in planner.keys], planner.dead_letter, planner.consumer) == (
        ["m:planner"],
        "dlq",
        "planner",
    )
    assert (planner.spec.retry.max_deliveries, planner.by_runner, planner.client) == (
        2,
        False,
        "planner",
    )
    assert ([k.key for k in scouts.keys], scouts.spec.start, scouts.dead_letter) == (
        ["m:scout"],
        "latest",
        None,
    )
    plan = diff(None, resolved)
    assert set(plan.groups_to_add) == {"planner", "scouts"}
    assert set(plan.keys_to_create) >= {"m:planner", "m:scout"}
    [text] = [c.detail for c in plan.changes if c.name == "planner" and c.what == "group"]
    assert text == "added (reads m:planner; agent planner's client)"


def test_inbox_mistakes_are_reported_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inbox on a stream without one key per agent, an unknown dead_letter, a bad
    backoff, a group name taken, and a key a runner group reads too: one error each."""
    config = write(
        tmp_path,
        """\
        harold:
          inbox: {dead_letter: dql}
        planner:
          inbox: {stream: tasks, retry: {backoff: {initial: 5s, max: 1s}, claim_idle: 10s}}
        worker:
          inbox: {group: g}
        """,
        """\
        g:
          stream: inbox
          vars: {agent: harold}
          routes: [{drop: true}]
        """,
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationFailed) as caught:
        load_project(config)
    assert [str(p) for p in caught.value.problems] == [
        "flows/agents.yaml:4:12: agents.harold.inbox: group g (flows/agents.yaml:10:3) already "
        "reads this agent's inbox, so each message would be handled twice; remove inbox: to "
        "let the group handle them, or the group to read them here",
        'flows/agents.yaml:4:26: agents.harold.inbox.dead_letter: dead_letter "dql" is not a '
        'declared stream; did you mean "dlq"?',
        'flows/agents.yaml:6:21: agents.planner.inbox.stream: inbox stream "tasks" must have '
        'one key per agent and no other variable, but its key is "t:{{ priority }}"; use a '
        'stream keyed "...{{ agent }}" such as inbox',
        "flows/agents.yaml:6:55: agents.planner.inbox.retry.backoff.initial: initial backoff "
        "(5s) is longer than max (1s); lower initial or raise max",
        "flows/agents.yaml:8:12: agents.worker.inbox: the group the agent's client reads is "
        'named "g", like the group at flows/agents.yaml:10:3; name it with inbox.group, or '
        "rename that group",
    ]
