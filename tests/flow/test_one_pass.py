"""Every error of a flows tree in one run of `validate`: no stage hides the next."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cortex_flow.cli import cli

# The tree that took five runs of validate to clear: a duplicate key, two schema errors,
# a cross-file duplicate, four reference errors (two of them in the file with the schema
# errors), and here also a file that cannot be parsed at all.
TREE = {
    "a.yaml": """\
version: 1
streams:
  tasks: {key: "t:tasks"}
groups:
  g1:
    stream: tasks
    concurrency: 2
    concurrency: 3
    routes:
      - to: nowhere
  g2:
    stream: taskz
    routes:
      - call: "m:f"
""",
    "b.yaml": """\
version: 1
streams:
  bad: {key: "t:bad", maxlen: 0}
groups:
  g3:
    stream: tasks
    batch: 0
    routes:
      - call: "m:f"
  g4:
    stream: tasks
    dead_letter: dlqq
    routes:
      - to: elsewhere
  g5:
    stream: bad
    routes:
      - to: broken
""",
    "c.yaml": 'version: 1\nstreams:\n  events: {key: "t:events"}\n',
    "d.yaml": 'version: 1\nstreams:\n  events: {key: "t:events2"}\n',
    "e.yaml": "version: 1\nstreams:\n  broken:\n    key: [\n",
}

EXPECTED = [
    'flows/a.yaml:8:5: groups.g1.concurrency: duplicate key "concurrency" (first defined at '
    "line 7)",
    'flows/a.yaml:10:13: groups.g1.routes[0].to: route target "nowhere" is not a declared '
    "stream; the declared streams are events, tasks",
    'flows/a.yaml:12:13: groups.g2.stream: stream "taskz" is not a declared stream; did you '
    'mean "tasks"?',
    "flows/b.yaml:3:31: streams.bad.maxlen: must be at least 1, got 0",
    "flows/b.yaml:7:12: groups.g3.batch: must be at least 1, got 0",
    'flows/b.yaml:12:18: groups.g4.dead_letter: dead_letter "dlqq" is not a declared stream; '
    "the declared streams are events, tasks",
    'flows/b.yaml:14:13: groups.g4.routes[0].to: route target "elsewhere" is not a declared '
    "stream; the declared streams are events, tasks",
    'flows/d.yaml:3:3: streams.events: stream "events" is defined twice: here and at '
    "flows/c.yaml:3:3; rename or remove one",
]


def test_every_error_of_the_tree_comes_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A duplicate key, two schema errors, a cross-file duplicate, four reference errors
    and a file that does not parse: all nine in the first run. A reference to a stream
    declared in an invalid entry (g5 -> bad) or in the unparseable file (-> broken) is not
    reported a second time as unknown."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flows").mkdir()
    for name, text in TREE.items():
        (tmp_path / "flows" / name).write_text(text)
    assert cli("validate") == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:8] == EXPECTED
    assert lines[8].startswith("flows/e.yaml:5:1: could not parse YAML:")
    assert lines[9:] == ["9 problems in 4 of 5 files"]


def test_run_and_plan_report_the_same_problems_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading for plan (as for run) reports the same nine problems together."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flows").mkdir()
    for name, text in TREE.items():
        (tmp_path / "flows" / name).write_text(text)
    assert cli("plan") == 1
    err = capsys.readouterr().err
    assert err.startswith("9 problems found:\n")
    assert all(line in err for line in EXPECTED)
    assert os.path.join("flows", "e.yaml") in err
