"""``cortex-flow test``: flow test files run against the real routing on a private Redis."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from projects import write_module, write_project

from cortex_flow.cli import cli

REPO = Path(__file__).resolve().parents[2]

FLOWS = """\
version: 1
streams:
  tasks: {key: "{P}t:{{ priority }}", priorities: [high, normal]}
  inbox: {key: "{P}m:{{ agent }}"}
  dlq: {key: "{P}dlq"}
  plain: {key: "{P}plain"}
agents:
  alice: {}
groups:
  router:
    stream: tasks
    dead_letter: dlq
    retry: {max_deliveries: 3}
    routes:
      - {when: "msg.to in agents", to: inbox, vars: {agent: "{{ msg.to }}"}}
      - {when: "msg.kind == 'job'", call: "{M}:work"}
      - {http: {url: "http://127.0.0.1:9/hook"}}
  keeper:
    stream: plain
    retry: {max_deliveries: 2}
    routes:
      - call: "{M}:work"
"""

HANDLERS = """\
def work(msg):
    if msg.get("bad"):
        raise ValueError("bad job " + msg.get("id", "?"))
"""


def make(tmp_path: Path, tests: str, *, prefix: str = "", url: str = "embedded") -> Path:
    """A project in ``tmp_path`` (flows, a handler module, one test file); returns config."""
    mod = write_module(tmp_path, HANDLERS)
    config = f'redis: {{url: "{url}"}}\nadmin: {{listen: "off"}}\n'
    path = write_project(tmp_path, FLOWS, config=config, prefix=prefix, mod=mod)
    tests = textwrap.dedent(tests).replace("{M}", mod)
    (tmp_path / "flows" / "main.test.yaml").write_text(tests)
    return path


def flow_test(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``cortex-flow test --config CONFIG ARGS``: the exit code and what it printed."""
    code = cli("test", "--config", str(config), *args)
    return code, capsys.readouterr().out


PASSING = """\
version: 1
cases:
  - name: direct message reaches the inbox
    send:
      - {stream: tasks, priority: high, msg: {to: alice, text: hi}}
    expect:
      - {stream: inbox, agent: alice, msg: {text: hi}}
"""

FAILING = """\
version: 1
cases:
  - name: direct message reaches the inbox
    send:
      - {stream: tasks, priority: high, msg: {to: alice, text: hi}}
    expect:
      - {stream: inbox, agent: alice, msg: {to: alice}}
  - name: expects the wrong text
    send:
      - {stream: tasks, msg: {to: alice, text: hi}}
    expect:
      - {stream: inbox, agent: alice, msg: {to: alice, text: hello}}
"""


def test_repository_flow_tests_pass(capsys: pytest.CaptureFixture[str]) -> None:
    """The repo's own flows/routing.test.yaml passes with the default discovery."""
    code, out = flow_test(REPO / "config.yaml", capsys)
    assert code == 0, out
    assert out.splitlines()[-1] == "6 passed, 0 failed"
    assert "PASS direct message goes to harold's inbox and his handler" in out


def test_passing_case_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file whose cases all pass prints PASS lines and exits 0."""
    code, out = flow_test(make(tmp_path, PASSING), capsys)
    assert code == 0, out
    assert out.splitlines() == ["PASS direct message reaches the inbox", "1 passed, 0 failed"]


def test_failing_case_shows_a_diff_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed expectation prints FAIL with the case's place and an expected/actual diff."""
    code, out = flow_test(make(tmp_path, FAILING), capsys)
    assert code == 1
    assert "PASS direct message reaches the inbox" in out
    assert "FAIL expects the wrong text (" in out and "main.test.yaml:8)" in out
    assert "  expect[0]: no entry of m:alice has these fields" in out
    assert '    -text: "hello"\n    +text: "hi"\n     to: "alice"' in out
    assert out.splitlines()[-1] == "1 passed, 1 failed"


def test_missing_entry_says_where_messages_went(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty expected stream is reported with the streams that did get entries."""
    tests = """\
    version: 1
    cases:
      - name: expects the wrong priority
        send: [{stream: tasks, msg: {to: alice}}]
        expect: [{stream: tasks, priority: high}]
    """
    code, out = flow_test(make(tmp_path, tests), capsys)
    assert code == 1
    assert "expect[0]: t:high is empty; entries went to: m:alice (1)" in out


def test_dead_letter_after_retries_and_stubbed_handlers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real failures are retried then dead-lettered fast; handlers and http can be stubbed."""
    tests = """\
    version: 1
    cases:
      - name: a failing job is dead-lettered after max_deliveries
        send: [{stream: tasks, msg: {kind: job, bad: "yes", id: "7"}}]
        dead_letters: [{group: router, error: "ValueError: bad job 7", msg: {id: 7}}]
      - name: a stub accepts what the real handler refuses
        handlers: {"{M}:work": ok}
        send: [{stream: tasks, msg: {kind: job, bad: "yes"}}]
        calls: [{call: "{M}:work", msg: {bad: "yes"}}]
      - name: a stub fails what the real handler accepts
        handlers: {"{M}:work": fail}
        send: [{stream: tasks, msg: {kind: job}}]
        dead_letters: [{error: stubbed failure}]
      - name: http routes are stubbed ok by default
        send: [{stream: tasks, msg: {kind: chat}}]
        calls: [{http: /hook, msg: {kind: chat}}]
      - name: http fail dead-letters
        http: fail
        send: [{stream: tasks, msg: {kind: chat}}]
        dead_letters: [{error: "HTTP 503"}]
      - name: a group without dead_letter leaves the entry pending
        send: [{stream: plain, msg: {bad: "yes"}}]
        pending: 1
    """
    code, out = flow_test(make(tmp_path, tests), capsys)
    assert code == 0, out
    assert out.splitlines()[-1] == "6 passed, 0 failed"


def test_unexpected_dead_letter_fails_the_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dead letters default to none: one that was not expected is listed with its error."""
    tests = """\
    version: 1
    cases:
      - name: job that fails
        send: [{stream: tasks, msg: {kind: job, bad: "yes", id: "9"}}]
    """
    code, out = flow_test(make(tmp_path, tests), capsys)
    assert code == 1
    assert "  dead_letters: expected 0, got 1" in out
    assert "(group router, 3 deliveries): routes[1]: ValueError: bad job 9" in out
    assert "runner log:" in out and "will retry" in out


def test_github_format_annotates_the_failing_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format github emits an ::error annotation at the failing case's line."""
    code, out = flow_test(make(tmp_path, FAILING), capsys, "--format", "github")
    assert code == 1
    [annotation] = [line for line in out.splitlines() if line.startswith("::error ")]
    assert "main.test.yaml,line=8,title=flow test failed::expects the wrong text%0A" in annotation
    assert out.splitlines()[-1] == "1 passed, 1 failed"


def test_invalid_test_file_reports_file_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unknown keys and unknown names in a test file are errors with file:line:col."""
    tests = """\
    version: 1
    cases:
      - name: typo
        sned: []
        send: [{stream: tasks, msg: {a: b}}]
    """
    config = make(tmp_path, tests)
    code, out = flow_test(config, capsys)
    assert code == 1
    assert 'main.test.yaml:4:5: cases[0].sned: unknown key "sned"; did you mean "send"?' in out
    (tmp_path / "flows" / "main.test.yaml").write_text(
        "version: 1\ncases:\n  - name: x\n    send: [{stream: taks, msg: {a: b}}]\n"
        "    handlers: {nope.mod:fn: ok}\n"
    )
    code, out = flow_test(config, capsys)
    assert code == 1
    assert 'main.test.yaml:4:21: cases[0].send[0].stream: "taks" is not a declared stream' in out
    assert 'main.test.yaml:5:16: cases[0].handlers.nope.mod:fn: "nope.mod:fn" is not the' in out


def test_paths_keyword_and_no_tests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PATHS pick files, -k picks cases; nothing to run, or a missing path, exits 1."""
    config = make(tmp_path, FAILING)
    test_file = str(tmp_path / "flows" / "main.test.yaml")
    code, out = flow_test(config, capsys, test_file, "-k", "reaches")
    assert code == 0
    assert out.splitlines()[-1] == "1 passed, 0 failed"
    code, out = flow_test(config, capsys, "-k", "no such case")
    assert code == 1
    assert "no flow test cases found" in out
    code, out = flow_test(config, capsys, str(tmp_path / "missing"))
    assert code == 1
    assert "missing:1:1: no such file or folder" in out


def test_url_runs_on_a_given_server(
    tmp_path: Path, redis_url: str, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--url runs the cases on that server, clearing only the flows' keys."""
    config = make(tmp_path, PASSING, prefix=key_prefix)
    code, out = flow_test(config, capsys, "--url", redis_url)
    assert code == 0, out
    assert out.splitlines()[-1] == "1 passed, 0 failed"
