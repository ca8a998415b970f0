"""`cortex-flow validate`: one test per kind of error, each pinning the exact line it prints.

Every test writes a small project into a temporary folder and runs the command from
there, so file names in messages are short and stable (``flows/groups.yaml:7:16: ...``).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from cortex_flow.cli import cli
from cortex_flow.errors import ValidationFailed
from cortex_flow.flow.loader import load_project

# Streams and agents most tests build on; their groups go to flows/groups.yaml.
STREAMS = """\
version: 1
streams:
  tasks:
    key: "cortex:tasks:{{ priority }}"
    priorities: [critical, high, normal, low]
  inbox:
    key: "cortex:messages:{{ agent }}"
  dlq:
    key: cortex:tasks:dlq
  heartbeats:
    key: cortex:heartbeats
  events:
    key: cortex:events
agents:
  harold: {}
  planner: {}
"""


class Project:
    """A project folder under test: write files, run the command, read what it printed."""

    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.capsys = capsys
        self.write("config.yaml", "flows: flows/\n")

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    def run(self, *args: str) -> tuple[int, str, str]:
        code = cli("validate", *args)
        out, err = self.capsys.readouterr()
        return code, out, err

    def problems(self, groups: str | None = None, *args: str) -> list[str]:
        """Validate (with STREAMS and ``groups``) expecting failure; the problem lines."""
        self.write("flows/streams.yaml", STREAMS)
        if groups is not None:
            self.write("flows/groups.yaml", groups)
        code, out, err = self.run(*args)
        assert code == 1, out + err
        lines = out.splitlines()
        assert " problem" in lines[-1], lines
        return lines[:-1]


@pytest.fixture
def project(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Project:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CORTEX_REDIS_URL", raising=False)
    return Project(tmp_path, capsys)


def group(body: str) -> str:
    """A groups file with one group ``g`` on ``tasks``: ``body`` is its indented YAML."""
    return "version: 1\ngroups:\n  g:\n" + textwrap.indent(textwrap.dedent(body), "    ")


# --- success and exit codes -----------------------------------------------------------


def test_valid_project_exits_0_with_a_summary(project: Project) -> None:
    """A valid project prints one ok line with the counts and exits 0."""
    project.write("flows/streams.yaml", STREAMS)
    project.write("flows/groups.yaml", group("stream: tasks\nroutes:\n  - drop: true\n"))
    assert project.run() == (0, "ok: 2 flow files: 5 streams, 1 groups, 2 agents\n", "")


def test_invalid_project_exits_1(project: Project) -> None:
    """Any problem makes the exit code 1."""
    project.write("flows/a.yaml", "version: 2\n")
    code, out, _ = project.run()
    assert code == 1
    assert out == "flows/a.yaml:1:10: version: must be 1, got 2\n1 problem in 1 of 2 files\n"


def test_unknown_option_is_a_usage_error_exit_2(project: Project) -> None:
    """An unknown option is a usage error: exit 2, the message on stderr."""
    code, out, err = project.run("--bogus")
    assert (code, out) == (2, "")
    assert err == "cortex-flow: unrecognized arguments: --bogus\n"


def test_unknown_format_is_a_usage_error_exit_2(project: Project) -> None:
    """--format accepts only text, json and github."""
    code, _, err = project.run("--format", "yaml")
    assert code == 2
    assert "invalid choice: 'yaml'" in err


def test_summary_counts_files_with_problems_and_files_read(project: Project) -> None:
    """The summary says how many of the files read (config included) have problems."""
    project.write("flows/a.yaml", "version: 2\n")
    project.write("flows/b.yaml", "version: 3\n")
    project.write("flows/c.yaml", "version: 1\n")
    _, out, _ = project.run()
    assert out.splitlines()[-1] == "2 problems in 2 of 4 files"


def test_explicit_paths_validate_only_those_files(project: Project) -> None:
    """Paths on the command line replace the flows folder of config.yaml."""
    project.write("flows/bad.yaml", "version: 2\n")
    project.write("other/ok.yaml", "version: 1\nstreams: {s: {key: k}}\n")
    assert project.run("other/ok.yaml")[0] == 0
    assert project.run("other")[0] == 0
    assert project.run()[0] == 1


def test_missing_path_is_a_usage_error(project: Project) -> None:
    """A path on the command line that does not exist is a usage error (exit 2), as the
    contract says, naming the path."""
    code, _, err = project.run("nowhere.yaml")
    assert code == 2
    assert err.startswith("validate: no such file or folder: nowhere.yaml;")


def test_missing_flows_folder_is_reported(project: Project) -> None:
    """A flows folder that does not exist says how to fix it."""
    code, out, _ = project.run()
    assert code == 1
    assert out.splitlines()[0] == (
        "flows:1:1: no such flows folder; create it or set flows: in config.yaml"
    )


def test_load_project_raises_validation_failed_with_every_problem(project: Project) -> None:
    """The library raises one ValidationFailed carrying every problem, sorted by place."""
    project.write("flows/a.yaml", "version: 1\nstreams: {s: {key: k, maxlen: 0}}\nx: 1\n")
    with pytest.raises(ValidationFailed) as caught:
        load_project(Path("config.yaml"))
    assert [str(p) for p in caught.value.problems] == [
        "flows/a.yaml:2:31: streams.s.maxlen: must be at least 1, got 0",
        'flows/a.yaml:3:1: x: unknown key "x"; allowed keys are agents, groups, heartbeats, '
        "streams, version",
    ]


# --- field errors ---------------------------------------------------------------------


def test_unknown_key_suggests_the_closest(project: Project) -> None:
    """An unknown key is an error that suggests the key meant."""
    assert project.problems(group("stream: tasks\nbatchh: 10\nroutes: [{drop: true}]\n")) == [
        'flows/groups.yaml:5:5: groups.g.batchh: unknown key "batchh"; did you mean "batch"?'
    ]


def test_unknown_key_lists_allowed_keys_when_nothing_is_close(project: Project) -> None:
    """With no close match, the message lists the keys allowed there."""
    text = group("stream: tasks\nroutes:\n  - drop: true\n    colour: red\n")
    assert project.problems(text) == [
        'flows/groups.yaml:7:9: groups.g.routes[0].colour: unknown key "colour"; allowed keys '
        "are a2a, call, continue, drop, http, name, set, to, vars, when"
    ]


def test_unknown_top_level_key(project: Project) -> None:
    """A misspelt section name is caught at the top level too."""
    assert project.problems("version: 1\nstream: {}\n") == [
        'flows/groups.yaml:2:1: stream: unknown key "stream"; did you mean "streams"?'
    ]


def test_missing_required_key(project: Project) -> None:
    """A group without stream names the missing key at the group."""
    assert project.problems(group("routes: [{drop: true}]\n")) == [
        'flows/groups.yaml:4:5: groups.g.stream: missing required key "stream"'
    ]


def test_missing_version(project: Project) -> None:
    """A flow file must say version: 1."""
    assert project.problems("streams: {}\n") == [
        'flows/groups.yaml:1:1: version: missing required key "version"'
    ]


def test_bad_duration(project: Project) -> None:
    """A duration without a known unit says how to write one."""
    text = group("stream: tasks\nretry: {claim_idle: 5x}\nroutes: [{drop: true}]\n")
    assert project.problems(text) == [
        'flows/groups.yaml:5:25: groups.g.retry.claim_idle: "5x" is not a duration; write a '
        "number and a unit (ms, s, m or h), such as 250ms, 30s, 5m, 1h or 1m30s"
    ]


def test_duration_without_unit(project: Project) -> None:
    """A bare number is not taken as seconds silently: the message shows the fix."""
    text = "version: 1\nagents:\n  harold: {heartbeat: {interval: 30}}\n"
    assert project.problems(text) == [
        "flows/groups.yaml:3:34: agents.harold.heartbeat.interval: 30 has no unit; write 30s "
        "for seconds (or 30ms, 30m, 30h)"
    ]


def test_zero_duration_where_positive_is_needed(project: Project) -> None:
    """Intervals and timeouts must be longer than zero."""
    text = "version: 1\nagents:\n  harold: {heartbeat: {interval: 0s}}\n"
    assert project.problems(text) == [
        "flows/groups.yaml:3:34: agents.harold.heartbeat.interval: must be longer than 0s, got 0s"
    ]


def test_bad_name_as_key(project: Project) -> None:
    """A stream name must be a plain identifier; the error points at the name."""
    assert project.problems("version: 1\nstreams:\n  1tasks: {key: x}\n") == [
        'flows/groups.yaml:3:3: streams.1tasks: "1tasks" is not a valid name; use letters, '
        "digits, _ . and -, starting with a letter"
    ]


def test_bad_name_as_reference(project: Project) -> None:
    """A reference to a stream must be a name too."""
    assert project.problems(group('stream: "my tasks"\nroutes: [{drop: true}]\n')) == [
        'flows/groups.yaml:4:13: groups.g.stream: "my tasks" is not a valid name (or reference '
        "to one); use letters, digits, _ . and -, starting with a letter"
    ]


def test_bad_call_target(project: Project) -> None:
    """call must be module.path:function."""
    assert project.problems(group("stream: tasks\nroutes:\n  - call: workers.run\n")) == [
        'flows/groups.yaml:6:15: groups.g.routes[0].call: "workers.run" is not a callable '
        "reference; write module.path:function, e.g. agents.worker:handle"
    ]


def test_call_of_the_wrong_type(project: Project) -> None:
    """call is a string or a mapping; anything else says which."""
    assert project.problems(group("stream: tasks\nroutes:\n  - call: 5\n")) == [
        "flows/groups.yaml:6:15: groups.g.routes[0].call: call must be module.path:function, "
        "or a mapping with function: (and timeout:, inline:), got 5"
    ]


def test_wrong_literal(project: Project) -> None:
    """start takes earliest or latest only."""
    assert project.problems(group("stream: tasks\nstart: sideways\nroutes: [{drop: true}]\n")) == [
        'flows/groups.yaml:5:12: groups.g.start: must be earliest or latest, got "sideways"'
    ]


def test_drop_false_is_not_an_action(project: Project) -> None:
    """drop can only be true."""
    assert project.problems(group("stream: tasks\nroutes:\n  - drop: false\n")) == [
        "flows/groups.yaml:6:15: groups.g.routes[0].drop: must be true, got false"
    ]


def test_number_below_minimum(project: Project) -> None:
    """Numbers have bounds; the message gives the bound and the value."""
    text = group("stream: tasks\nretry: {max_deliveries: 0}\nroutes: [{drop: true}]\n")
    assert project.problems(text) == [
        "flows/groups.yaml:5:29: groups.g.retry.max_deliveries: must be at least 1, got 0"
    ]


def test_wrong_type(project: Project) -> None:
    """A string where a number belongs says what was expected."""
    text = group("stream: tasks\nconcurrency: lots\nroutes: [{drop: true}]\n")
    assert project.problems(text) == [
        'flows/groups.yaml:5:18: groups.g.concurrency: must be a whole number, got "lots"'
    ]


def test_route_with_two_actions(project: Project) -> None:
    """A route has exactly one action; two are named, with the fix."""
    text = group("stream: tasks\nroutes:\n  - to: dlq\n    call: workers:run\n")
    assert project.problems(text) == [
        "flows/groups.yaml:6:9: groups.g.routes[0]: a route needs exactly one action (to, call, "
        "http, a2a or drop: true) but has to and call; split it into routes with continue: true, "
        "or remove all but one"
    ]


def test_route_without_action(project: Project) -> None:
    """A route with no action at all is an error."""
    assert project.problems(group("stream: tasks\nroutes:\n  - when: \"msg.x == '1'\"\n")) == [
        "flows/groups.yaml:6:9: groups.g.routes[0]: a route needs exactly one action (to, call, "
        "http, a2a or drop: true) but has none; add one"
    ]


def test_vars_without_to(project: Project) -> None:
    """vars only make sense on a route that publishes."""
    text = group("stream: tasks\nroutes:\n  - call: workers:run\n    vars: {agent: harold}\n")
    assert project.problems(text) == [
        "flows/groups.yaml:7:9: groups.g.routes[0].vars: vars only applies to a route that "
        "publishes with to; this route uses call, so remove vars"
    ]


def test_empty_routes(project: Project) -> None:
    """A group needs at least one route."""
    assert project.problems(group("stream: tasks\nroutes: []\n")) == [
        "flows/groups.yaml:5:13: groups.g.routes: must not be empty"
    ]


def test_http_url_must_be_http(project: Project) -> None:
    """http routes take http:// or https:// URLs only."""
    assert project.problems(group('stream: tasks\nroutes:\n  - http: {url: "ftp://x"}\n')) == [
        'flows/groups.yaml:6:21: groups.g.routes[0].http.url: "ftp://x" is not an http:// or '
        "https:// URL"
    ]


def test_repeated_priority(project: Project) -> None:
    """Priority levels must be unique."""
    text = 'version: 1\nstreams:\n  s: {key: "s:{{ priority }}", priorities: [a, b, a]}\n'
    assert project.problems(text) == [
        'flows/groups.yaml:3:44: streams.s.priorities: priorities must be unique, but "a" is '
        "listed more than once; remove the repeat"
    ]


# --- references -----------------------------------------------------------------------


def test_unknown_group_stream_suggests_the_closest(project: Project) -> None:
    """A group reading an undeclared stream gets a did-you-mean."""
    assert project.problems(group("stream: taks\nroutes: [{drop: true}]\n")) == [
        'flows/groups.yaml:4:13: groups.g.stream: stream "taks" is not a declared stream; '
        'did you mean "tasks"?'
    ]


def test_unknown_dead_letter(project: Project) -> None:
    """dead_letter must name a declared stream."""
    text = group("stream: tasks\ndead_letter: dql\nroutes: [{drop: true}]\n")
    assert project.problems(text) == [
        'flows/groups.yaml:5:18: groups.g.dead_letter: dead_letter "dql" is not a declared '
        'stream; did you mean "dlq"?'
    ]


def test_unknown_route_target(project: Project) -> None:
    """A route's to must name a declared stream."""
    text = group("stream: tasks\nroutes:\n  - to: inbx\n    vars: {agent: harold}\n")
    assert project.problems(text) == [
        'flows/groups.yaml:6:13: groups.g.routes[0].to: route target "inbx" is not a declared '
        'stream; did you mean "inbox"?'
    ]


def test_unknown_reference_without_a_close_name_lists_streams(project: Project) -> None:
    """With no close name, the declared streams are listed."""
    assert project.problems(group("stream: zzz\nroutes: [{drop: true}]\n")) == [
        'flows/groups.yaml:4:13: groups.g.stream: stream "zzz" is not a declared stream; the '
        "declared streams are dlq, events, heartbeats, inbox, tasks"
    ]


def test_unknown_heartbeat_and_event_streams(project: Project) -> None:
    """heartbeats.stream and heartbeats.on_down.to must name declared streams."""
    text = "version: 1\nheartbeats:\n  stream: heartbeat\n  on_down: {to: event}\n"
    assert project.problems(text) == [
        'flows/groups.yaml:3:11: heartbeats.stream: heartbeat stream "heartbeat" is not a '
        'declared stream; did you mean "heartbeats"?',
        'flows/groups.yaml:4:17: heartbeats.on_down.to: event stream "event" is not a declared '
        'stream; did you mean "events"?',
    ]


# --- templates ------------------------------------------------------------------------


def test_syntax_error_in_when(project: Project) -> None:
    """A broken when expression is a validation error at its line."""
    text = group('stream: tasks\nroutes:\n  - when: "msg.to =="\n    drop: true\n')
    assert project.problems(text) == [
        'flows/groups.yaml:6:15: groups.g.routes[0].when: expression "msg.to ==" has a syntax '
        "error: unexpected 'end of expression'"
    ]


def test_syntax_error_in_route_vars(project: Project) -> None:
    """A broken template in vars is reported at the var."""
    text = group('stream: tasks\nroutes:\n  - to: inbox\n    vars: {agent: "{{ msg.to "}\n')
    assert project.problems(text) == [
        'flows/groups.yaml:7:23: groups.g.routes[0].vars.agent: template "{{ msg.to" has a '
        "syntax error: unexpected end of template, expected 'end of print statement'"
    ]


def test_syntax_error_in_set(project: Project) -> None:
    """A broken template in set is reported at the field."""
    text = group('stream: tasks\nroutes:\n  - to: dlq\n    set: {body: "{% if msg.x %}yes"}\n')
    assert project.problems(text) == [
        'flows/groups.yaml:7:21: groups.g.routes[0].set.body: template "{% if msg.x %}yes" has '
        "a syntax error: unexpected end of template. Jinja was looking for the following tags: "
        "'elif' or 'else' or 'endif'. The innermost block that needs to be closed is 'if'"
    ]


def test_syntax_error_in_a_multi_line_template_names_its_line(project: Project) -> None:
    """In a block scalar, the message says which line of the template is wrong."""
    text = group(
        "stream: tasks\nroutes:\n  - to: dlq\n    set:\n      body: |\n"
        "        first {{ msg.a }}\n        second {{ msg.b c }}\n"
    )
    assert project.problems(text) == [
        'flows/groups.yaml:8:17: groups.g.routes[0].set.body: template "first {{ msg.a }} '
        "second {{ msg.b c }}\" has a syntax error: expected token 'end of print statement', "
        "got 'c' (line 2 of the text)"
    ]


def test_syntax_error_in_key(project: Project) -> None:
    """A stream key is a template too."""
    assert project.problems('version: 1\nstreams:\n  s: {key: "s:{{ x"}\n') == [
        'flows/groups.yaml:3:12: streams.s.key: key "s:{{ x" has a syntax error: unexpected end '
        "of template, expected 'end of print statement'"
    ]


def test_unknown_filter_in_when(project: Project) -> None:
    """Filters are checked at validation time, even under a condition."""
    text = group('stream: tasks\nroutes:\n  - when: "msg.x | shout"\n    drop: true\n')
    assert project.problems(text) == [
        'flows/groups.yaml:6:15: groups.g.routes[0].when: expression "msg.x | shout" has a '
        "syntax error: no filter named 'shout'"
    ]


def test_unknown_name_in_template_suggests_msg(project: Project) -> None:
    """`mgs.to` is caught at validation, with the name meant."""
    text = group(
        "stream: tasks\nroutes:\n  - when: \"mgs.to == 'x'\"\n    to: inbox\n"
        '    vars: {agent: "{{ mgs.to }}"}\n'
    )
    assert project.problems(text) == [
        'flows/groups.yaml:6:15: groups.g.routes[0].when: expression uses unknown name "mgs"; '
        'did you mean "msg"?',
        'flows/groups.yaml:8:23: groups.g.routes[0].vars.agent: template uses unknown name "mgs"; '
        'did you mean "msg"?',
    ]


def test_unknown_name_without_a_close_one_lists_the_names(project: Project) -> None:
    """With no close name, the names a template may use are listed."""
    text = group('stream: tasks\nroutes:\n  - when: "payload.x"\n    drop: true\n')
    assert project.problems(text) == [
        "flows/groups.yaml:6:15: groups.g.routes[0].when: expression uses unknown name "
        '"payload"; the names available are agent, agents, deliveries, group, id, msg, now, '
        "priority, stream"
    ]


# --- key variables --------------------------------------------------------------------


def test_key_variable_not_bound(project: Project) -> None:
    """Publishing to inbox needs an agent; the message shows the vars to add."""
    assert project.problems(group("stream: tasks\nroutes:\n  - to: inbox\n")) == [
        'flows/groups.yaml:6:13: groups.g.routes[0].to: publishing to "inbox" needs a value for '
        '"agent" in its key "cortex:messages:{{ agent }}"; add vars: {agent: "{{ msg.to }}"}'
    ]


def test_route_vars_not_used_by_the_target_key(project: Project) -> None:
    """A route var the target key does not use is an error."""
    text = group("stream: tasks\nroutes:\n  - to: dlq\n    vars: {agent: harold}\n")
    assert project.problems(text) == [
        'flows/groups.yaml:7:16: groups.g.routes[0].vars.agent: "agent" is not a variable of '
        'the key of stream "dlq" ("cortex:tasks:dlq"); remove it from vars'
    ]


def test_group_vars_not_used_by_the_key(project: Project) -> None:
    """A group var the stream key does not use is an error."""
    text = group("stream: tasks\nvars: {agent: harold}\nroutes: [{drop: true}]\n")
    assert project.problems(text) == [
        'flows/groups.yaml:5:12: groups.g.vars.agent: "agent" is not a variable of the key of '
        'stream "tasks" ("cortex:tasks:{{ priority }}"); remove it from vars'
    ]


def test_group_vars_are_not_templates(project: Project) -> None:
    """A group binds fixed values: it reads keys before any message exists."""
    text = group('stream: inbox\nvars: {agent: "{{ msg.to }}"}\nroutes: [{drop: true}]\n')
    assert project.problems(text) == [
        "flows/groups.yaml:5:19: groups.g.vars.agent: group vars are fixed values, not "
        'templates, got "{{ msg.to }}"; a group reads known keys before any message arrives'
    ]


def test_group_on_a_key_with_an_unbound_variable(project: Project) -> None:
    """A group on a stream whose key needs a variable must bind it."""
    text = group("stream: tenant\nroutes: [{drop: true}]\n").replace(
        "version: 1\n", 'version: 1\nstreams:\n  tenant: {key: "t:{{ tenant }}"}\n'
    )
    assert project.problems(text) == [
        'flows/groups.yaml:6:13: groups.g.stream: stream "tenant" has a key variable the group '
        'must fix ("t:{{ tenant }}"); add vars: {tenant: <value>}'
    ]


def test_message_names_in_a_key_are_refused(project: Project) -> None:
    """A key cannot depend on msg: a group must know its keys before messages arrive."""
    assert project.problems('version: 1\nstreams:\n  s: {key: "s:{{ msg.to }}"}\n') == [
        'flows/groups.yaml:3:12: streams.s.key: the key uses "msg", which only exists while a '
        "message is handled; name a key variable instead (e.g. {{ tenant }}) and bind it with "
        "vars"
    ]


def test_priorities_without_priority_in_the_key(project: Project) -> None:
    """Priorities need {{ priority }} in the key, or the levels would share one key."""
    text = "version: 1\nstreams:\n  s: {key: work, priorities: [high, low]}\n"
    assert project.problems(text) == [
        'flows/groups.yaml:3:12: streams.s.key: the stream declares priorities but its key "work" '
        "has no {{ priority }}, so every level would share one Redis key; add {{ priority }} to "
        'the key, e.g. "work:{{ priority }}"'
    ]


def test_priority_in_the_key_without_priorities(project: Project) -> None:
    """{{ priority }} in a key needs the stream's priorities."""
    assert project.problems('version: 1\nstreams:\n  s: {key: "w:{{ priority }}"}\n') == [
        "flows/groups.yaml:3:12: streams.s.key: the key uses {{ priority }} but the stream "
        "declares no priorities; add priorities: [critical, high, normal, low] (highest first)"
    ]


def test_two_streams_with_the_same_redis_key(project: Project) -> None:
    """Two streams must not render to the same Redis key, even through a template."""
    text = 'version: 1\nstreams:\n  harold_inbox: {key: "cortex:messages:harold"}\n'
    assert project.problems(text) == [
        'flows/streams.yaml:7:10: streams.inbox.key: key "cortex:messages:harold" is also a key '
        'of stream "harold_inbox" (flows/groups.yaml:3:3); two streams must not share a Redis '
        "key, so change one of the keys"
    ]


# --- duplicates -----------------------------------------------------------------------


def test_name_defined_twice_in_one_file(project: Project) -> None:
    """A duplicate YAML key is an error naming the first place."""
    text = "version: 1\nstreams:\n  a: {key: a}\n  a: {key: b}\n"
    assert project.problems(text) == [
        'flows/groups.yaml:4:3: streams.a: duplicate key "a" (first defined at line 3)'
    ]


def test_name_defined_in_two_files_names_both_places(project: Project) -> None:
    """A stream declared in two files is an error that names both places."""
    text = "version: 1\nstreams:\n  # the second one\n  dlq: {key: other:dlq}\n"
    assert project.problems(text) == [
        'flows/streams.yaml:8:3: streams.dlq: stream "dlq" is defined twice: here and at '
        "flows/groups.yaml:4:3; rename or remove one"
    ]


def test_agent_defined_in_two_files(project: Project) -> None:
    """Agents share one namespace across files too."""
    assert project.problems("version: 1\nagents:\n  harold:\n") == [
        'flows/streams.yaml:15:3: agents.harold: agent "harold" is defined twice: here and at '
        "flows/groups.yaml:3:3; rename or remove one"
    ]


def test_heartbeats_defined_twice(project: Project) -> None:
    """There is one heartbeats section in a topology."""
    project.write("flows/a.yaml", "version: 1\nheartbeats: {stream: heartbeats}\n")
    project.write("flows/b.yaml", "version: 1\nheartbeats: {stream: heartbeats}\n")
    assert project.problems() == [
        "flows/b.yaml:2:1: heartbeats: heartbeats is defined twice: here and at "
        "flows/a.yaml:2:1; a topology follows one heartbeat stream, so keep one"
    ]


# --- groups: dead letters, retries, priorities, loops -----------------------------------


def test_dead_letter_equal_to_source_stream(project: Project) -> None:
    """Dead-lettering into the stream a group reads would loop forever."""
    text = group("stream: dlq\ndead_letter: dlq\nroutes: [{drop: true}]\n")
    assert project.problems(text) == [
        'flows/groups.yaml:5:18: groups.g.dead_letter: dead_letter "dlq" is the stream this '
        "group reads, so failed messages would be read again forever; use a separate stream "
        "such as dlq"
    ]


def test_dead_letter_with_variables(project: Project) -> None:
    """A dead-letter stream is one key, not a family."""
    text = group("stream: tasks\ndead_letter: inbox\nroutes: [{drop: true}]\n")
    assert project.problems(text) == [
        'flows/groups.yaml:5:18: groups.g.dead_letter: dead_letter "inbox" must be one stream, '
        'but its key "cortex:messages:{{ agent }}" has variables (agent); use a stream whose '
        "key is fixed text"
    ]


def test_heartbeat_stream_with_variables(project: Project) -> None:
    """The heartbeat stream is one key, not a family."""
    assert project.problems("version: 1\nheartbeats: {stream: tasks}\n") == [
        'flows/groups.yaml:2:22: heartbeats.stream: heartbeat stream "tasks" must be one stream, '
        'but its key "cortex:tasks:{{ priority }}" has variables (priority); use a stream whose '
        "key is fixed text"
    ]


def test_heartbeat_timeout_not_above_interval(project: Project) -> None:
    """A timeout at or below the interval would mark agents down between beats."""
    text = "version: 1\nagents:\n  bob: {heartbeat: {interval: 30s, timeout: 30s}}\n"
    assert project.problems(text) == [
        "flows/groups.yaml:3:45: agents.bob.heartbeat.timeout: timeout (30s) must be longer than "
        "interval (30s), or the agent is marked down between two beats; raise it, or remove it "
        "for the default of 3 x interval"
    ]


def test_backoff_initial_above_max(project: Project) -> None:
    """The first backoff cannot exceed the longest."""
    text = group(
        "stream: tasks\nretry: {backoff: {initial: 2m, max: 1m}, claim_idle: 5m}\n"
        "routes: [{drop: true}]\n"
    )
    assert project.problems(text) == [
        "flows/groups.yaml:5:32: groups.g.retry.backoff.initial: initial backoff (2m) is longer "
        "than max (1m); lower initial or raise max"
    ]


def test_claim_idle_below_initial_backoff(project: Project) -> None:
    """Claiming before the retry is due would steal messages from their consumer."""
    text = group(
        "stream: tasks\nretry: {backoff: {initial: 30s}, claim_idle: 10s}\nroutes: [{drop: true}]\n"
    )
    assert project.problems(text) == [
        "flows/groups.yaml:5:50: groups.g.retry.claim_idle: claim_idle (10s) is shorter than the "
        "first backoff (30s), so other consumers would claim failed messages before their retry "
        "is due; raise claim_idle or lower backoff.initial"
    ]


def test_claim_idle_may_be_shorter_than_a_call_timeout(project: Project) -> None:
    """A long call under a short claim_idle is valid: the runner renews the entry's lease."""
    text = group(
        "stream: tasks\nretry: {claim_idle: 30s}\nroutes:\n"
        "  - {when: 'msg.a', http: {url: 'http://h/x', timeout: 2m}}\n"
        "  - call: {function: a.b:c, timeout: 10m}\n"
    )
    project.write("flows/streams.yaml", STREAMS)
    project.write("flows/groups.yaml", text)
    assert project.run()[0] == 0


def test_weighted_without_priorities(project: Project) -> None:
    """Weighted priority needs a stream with priority levels."""
    text = group("stream: dlq\npriority: weighted\nroutes: [{drop: true}]\n")
    assert project.problems(text) == [
        "flows/groups.yaml:5:15: groups.g.priority: priority: weighted needs a stream with "
        'priorities, but stream "dlq" has none; use priority: strict'
    ]


def test_weights_for_an_unknown_level_and_a_missing_level(project: Project) -> None:
    """Weights must cover exactly the stream's levels."""
    text = group(
        "stream: tasks\npriority: weighted\n"
        "weights: {critical: 8, high: 4, normal: 2, urgent: 1}\nroutes: [{drop: true}]\n"
    )
    assert project.problems(text) == [
        'flows/groups.yaml:6:14: groups.g.weights: no weight given for priority "low"; give '
        'every level of stream "tasks" (critical, high, normal, low) a weight, or remove '
        "weights for the default",
        'flows/groups.yaml:6:48: groups.g.weights.urgent: "urgent" is not a priority of stream '
        '"tasks" (critical, high, normal, low); remove it or fix the spelling',
    ]


def test_weights_without_weighted(project: Project) -> None:
    """Weights only apply with priority: weighted."""
    text = group("stream: tasks\nweights: {critical: 2}\nroutes: [{drop: true}]\n")
    assert project.problems(text) == [
        "flows/groups.yaml:5:5: groups.g.weights: weights only apply with priority: weighted; "
        "add priority: weighted or remove weights"
    ]


def test_weight_below_one(project: Project) -> None:
    """A weight is a whole number of at least 1."""
    text = group(
        "stream: tasks\npriority: weighted\nweights: {critical: 0}\nroutes: [{drop: true}]\n"
    )
    assert project.problems(text) == [
        "flows/groups.yaml:6:25: groups.g.weights.critical: must be at least 1, got 0"
    ]


def test_endless_loop_route(project: Project) -> None:
    """A route sending everything back to its own stream is an endless loop."""
    assert project.problems(group("stream: dlq\nroutes:\n  - to: dlq\n")) == [
        "flows/groups.yaml:6:13: groups.g.routes[0].to: the route sends every message back to "
        '"dlq", the stream this group reads: an endless loop; add a when, or publish to another '
        "stream"
    ]


def test_a_conditional_route_back_to_the_same_stream_is_allowed(project: Project) -> None:
    """With a when, a route may send messages back (e.g. to re-prioritise them)."""
    project.write("flows/streams.yaml", STREAMS)
    project.write(
        "flows/groups.yaml",
        group(
            "stream: tasks\nroutes:\n  - when: \"msg.escalate == '1'\"\n    to: tasks\n"
            "    vars: {priority: critical}\n"
        ),
    )
    assert project.run()[0] == 0


def test_agents_stream_without_agents(project: Project) -> None:
    """A per-agent stream read without agents has no key to read."""
    text = (
        'version: 1\nstreams:\n  box: {key: "box:{{ agent }}"}\n'
        "groups:\n  g:\n    stream: box\n    routes: [{drop: true}]\n"
    )
    project.write("flows/groups.yaml", text)
    code, out, _ = project.run("flows/groups.yaml")
    assert code == 1
    assert out.splitlines()[0] == (
        'flows/groups.yaml:6:13: groups.g.stream: stream "box" has one key per agent but no '
        "agents are declared; declare agents, or read one agent's stream with vars: "
        "{agent: <name>}"
    )


# --- whole files ----------------------------------------------------------------------


def test_empty_file(project: Project) -> None:
    """An empty flow file is an error that says how to start it."""
    assert project.problems("") == [
        "flows/groups.yaml:1:1: flow file is empty; start it with version: 1"
    ]


def test_comments_only_file_is_empty(project: Project) -> None:
    """A file of comments only is empty too."""
    assert project.problems("# nothing yet\n") == [
        "flows/groups.yaml:1:1: flow file is empty; start it with version: 1"
    ]


def test_top_level_list(project: Project) -> None:
    """The top level of a flow file is a mapping."""
    assert project.problems("- version: 1\n") == [
        "flows/groups.yaml:1:1: flow file must be a mapping (key: value lines) at the top "
        "level, got a list; start it with version: 1"
    ]


def test_yaml_syntax_error(project: Project) -> None:
    """Broken YAML is reported with its place, and other files are still checked."""
    project.write("flows/z.yaml", "version: 2\n")
    assert project.problems("version: 1\nstreams: {a: [}\n") == [
        "flows/groups.yaml:2:15: could not parse YAML: expected the node content, but found '}' "
        "(while parsing a flow node at line 2, column 15)",
        "flows/z.yaml:1:10: version: must be 1, got 2",
    ]


def test_missing_environment_variables_are_all_reported(project: Project) -> None:
    """Every unset ${VAR} of a flow file is reported, each at its place."""
    project.root.joinpath("config.yaml").write_text("flows: flows/\n")
    text = 'version: 1\nstreams:\n  a: {key: "${CF_TEST_A}"}\n  b: {key: "${CF_TEST_B}"}\n'
    assert project.problems(text) == [
        "flows/groups.yaml:3:13: environment variable CF_TEST_A is not set; set it or give a "
        "default with ${CF_TEST_A:-value}",
        "flows/groups.yaml:4:13: environment variable CF_TEST_B is not set; set it or give a "
        "default with ${CF_TEST_B:-value}",
    ]


def test_environment_variables_fill_flow_files(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A set variable is used, and a default fills an unset one."""
    monkeypatch.setenv("CF_TEST_KEY", "from:env")
    project.write("flows/a.yaml", 'version: 1\nstreams:\n  a: {key: "${CF_TEST_KEY}"}\n')
    project.write("flows/b.yaml", 'version: 1\nstreams:\n  b: {key: "${CF_TEST_NONE:-x:y}"}\n')
    assert project.run()[0] == 0
    streams = load_project(Path("config.yaml")).topology.streams
    assert (streams["a"].key, streams["b"].key) == ("from:env", "x:y")


# --- config ---------------------------------------------------------------------------


def test_config_and_flow_errors_are_reported_together(project: Project) -> None:
    """Config problems do not hide flow problems: one run reports all of them."""
    project.write(
        "config.yaml",
        "redis: {url: http://localhost}\nadmin: {listen: garbage}\nflow: flows/\n",
    )
    assert project.problems(group("stream: taks\nroutes: [{drop: true}]\n")) == [
        'config.yaml:1:14: redis.url: "http://localhost" is not a Redis URL; use '
        "redis://host:port, rediss://host:port, unix:///path/to/socket, "
        "redis+sentinel://host:port/service, redis+cluster://host:port (rediss+sentinel:// "
        "and rediss+cluster:// for TLS), or embedded for a private server",
        'config.yaml:2:17: admin.listen: must be host:port (e.g. 127.0.0.1:8477) or "off" to '
        'disable, got "garbage"',
        'config.yaml:3:1: flow: unknown key "flow"; did you mean "flows"?',
        'flows/groups.yaml:4:13: groups.g.stream: stream "taks" is not a declared stream; '
        'did you mean "tasks"?',
    ]


def test_config_literal_and_duration_errors(project: Project) -> None:
    """Config values are checked like flow values."""
    project.write("config.yaml", "log: {level: loud}\nrunner: {shutdown_grace: soon}\n")
    assert project.problems() == [
        'config.yaml:1:14: log.level: must be debug, info, warning or error, got "loud"',
        'config.yaml:2:26: runner.shutdown_grace: "soon" is not a duration; write a number and '
        "a unit (ms, s, m or h), such as 250ms, 30s, 5m, 1h or 1m30s",
    ]


def test_missing_config_file_given_explicitly(project: Project) -> None:
    """An explicit --config that does not exist is an error; the default one is optional."""
    project.write("flows/streams.yaml", STREAMS)
    code, out, _ = project.run("--config", "nope.yaml")
    assert code == 1
    assert out.splitlines()[0] == "nope.yaml:1:1: config file not found; check the --config path"
    project.root.joinpath("config.yaml").unlink()
    assert project.run()[0] == 0


def test_admin_listen_off_and_false(project: Project) -> None:
    """admin.listen takes "off" or false to disable the endpoint."""
    project.write("flows/streams.yaml", STREAMS)
    for value in ("off", "false", "OFF", "127.0.0.1:9000", "[::1]:9000", "localhost:9000"):
        project.write("config.yaml", f"admin: {{listen: {value!r}}}\n".replace("'false'", "false"))
        assert project.run()[0] == 0, value


TOKEN = "0123456789abcdef0123"


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", TOKEN)
    return TOKEN


def test_admin_listen_beyond_loopback_needs_allow_public(project: Project, token: str) -> None:
    """A non-loopback admin.listen is a validation error unless admin.allow_public is true."""
    project.write("config.yaml", "admin:\n  listen: 0.0.0.0:8477\n")
    assert project.problems() == [
        "config.yaml:2:3: admin.listen: admin.listen 0.0.0.0:8477 is not a loopback address; "
        "set admin.allow_public: true to expose /metrics and POST /reload beyond this machine"
    ]
    project.write(
        "config.yaml",
        "admin:\n  listen: 10.0.0.5:8477\n  allow_public: true\n  token: ${CORTEX_ADMIN_TOKEN}\n",
    )
    assert project.run()[0] == 0


def test_admin_beyond_loopback_needs_a_token(project: Project, token: str) -> None:
    """A non-loopback admin.listen with allow_public but no admin.token is a validation error."""
    project.write("config.yaml", "admin:\n  listen: 10.0.0.5:8477\n  allow_public: true\n")
    assert project.problems() == [
        "config.yaml:2:3: admin.listen: admin.listen 10.0.0.5:8477 is not a loopback address, "
        "so POST /reload needs a token: set admin.token: ${CORTEX_ADMIN_TOKEN} and export "
        "CORTEX_ADMIN_TOKEN (e.g. from `openssl rand -hex 32`)"
    ]


def test_admin_token_written_in_the_file_is_refused(project: Project, token: str) -> None:
    """admin.token must be a ${VAR} reference; a literal value is refused at its place."""
    project.write("config.yaml", f"admin:\n  token: {token}\n")
    assert project.problems() == [
        "config.yaml:2:10: admin.token: must come from the environment, not be written in the "
        "file (it would end up in version control and backups); write admin.token: "
        "${CORTEX_ADMIN_TOKEN} and export CORTEX_ADMIN_TOKEN"
    ]
    for text in ("${CORTEX_ADMIN_TOKEN}", '"${CORTEX_ADMIN_TOKEN}"', "${NOPE:-" + token + "}"):
        project.write("config.yaml", f"admin:\n  token: {text}\n")
        assert project.run()[0] == 0, text


def test_admin_token_too_short_never_shows_it(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short admin.token is refused with its length, never its value."""
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", "hunter2")
    project.write("config.yaml", "admin:\n  token: ${CORTEX_ADMIN_TOKEN}\n")
    assert project.problems() == [
        "config.yaml:2:10: admin.token: must be at least 16 characters without surrounding "
        "spaces, got 7; generate one, e.g. `openssl rand -hex 32`"
    ]


def test_admin_token_that_yaml_reads_as_a_list_is_refused_unseen(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token YAML parses as a list is refused without showing it; digits only are a token."""
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", "[98765432109876543210]")
    project.write("config.yaml", "admin:\n  token: ${CORTEX_ADMIN_TOKEN}\n")
    assert project.problems() == [
        'config.yaml:2:10: admin.token: must be one string; quote it: token: "${CORTEX_ADMIN_'
        'TOKEN}" (the value is not shown: it is a secret)'
    ]
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", "98765432109876543210")
    assert project.run()[0] == 0


def test_admin_on_every_address_needs_allowed_hosts(project: Project, token: str) -> None:
    """admin.listen 0.0.0.0 needs admin.allowed_hosts: the Host names clients use are unknown."""
    base = "admin:\n  listen: 0.0.0.0:8477\n  allow_public: true\n  token: ${CORTEX_ADMIN_TOKEN}\n"
    project.write("config.yaml", base)
    assert project.problems() == [
        "config.yaml:2:3: admin.listen: admin.listen 0.0.0.0:8477 listens on every address, "
        "so the Host names clients use are unknown: list them in admin.allowed_hosts (e.g. "
        '["10.0.0.5", "runner-1.internal"]), or ["*"] to accept any Host header'
    ]
    project.write("config.yaml", base + '  allowed_hosts: ["*"]\n')
    assert project.run()[0] == 0


def test_admin_allowed_hosts_are_names(project: Project) -> None:
    """admin.allowed_hosts takes names and addresses, not URLs or host:port."""
    project.write(
        "config.yaml", 'admin:\n  allowed_hosts: [runner-1.internal, "::1", "http://x:80"]\n'
    )
    assert project.problems() == [
        'config.yaml:2:45: admin.allowed_hosts[2]: "http://x:80" is not a host name or address; '
        'list them without scheme or port, e.g. ["metrics.internal", "10.0.0.5"], or "*" for any'
    ]


@pytest.mark.parametrize(
    "url",
    [
        "rediss+sentinel://s1:26379,s2:26379/mymaster",
        "rediss+cluster://n1:7000,n2:7000",
        "redis+sentinel://s1:26379/mymaster",
        "unix:///run/redis.sock",
        "embedded",
    ],
)
def test_every_url_the_runner_can_connect_with_is_valid(project: Project, url: str) -> None:
    """redis.url accepts what the connection layer accepts, TLS Sentinel and Cluster too."""
    project.write("flows/streams.yaml", STREAMS)
    project.write("config.yaml", f"redis: {{url: '{url}'}}\n")
    assert project.run()[0] == 0, url


def test_unusable_redis_url_is_one_sentence_without_the_password(project: Project) -> None:
    """A URL the connection layer refuses is reported whole, the password masked."""
    project.write("config.yaml", "redis: {url: 'redis+sentinel://:hunter2@s1:26379'}\n")
    assert project.problems() == [
        'config.yaml:1:14: redis.url: "redis+sentinel://:***@s1:26379" names no sentinel '
        "service; add it: .../service_name"
    ]
    project.write("config.yaml", "redis: {url: 'redis://:hunter2@'}\n")
    assert project.problems() == [
        'config.yaml:1:14: redis.url: "redis://:***@" names no host; write it as '
        "scheme://host:port, e.g. redis://127.0.0.1:6379"
    ]


def test_missing_environment_variable_in_config(project: Project) -> None:
    """${VAR} without a default in config.yaml is reported at its place."""
    project.write("flows/streams.yaml", STREAMS)
    project.write("config.yaml", "redis: {url: '${CF_TEST_URL}'}\n")
    code, out, _ = project.run()
    assert code == 1
    assert out.splitlines()[0] == (
        "config.yaml:1:15: environment variable CF_TEST_URL is not set; set it or give a "
        "default with ${CF_TEST_URL:-value}"
    )


# --- --check-imports ------------------------------------------------------------------


def test_check_imports_reports_a_module_that_cannot_be_imported(project: Project) -> None:
    """--check-imports imports every call target and reports what fails."""
    project.write("cf_test_handlers.py", "def ok(msg):\n    return None\n\nvalue = 3\n")
    text = group(
        "stream: tasks\nroutes:\n  - call: cf_test_nowhere.handlers:run\n"
        "  - call: cf_test_handlers:missing\n  - call: cf_test_handlers:value\n"
        "  - call: cf_test_handlers:ok\n"
    )
    lines = project.problems(text, "--check-imports")
    path = (project.root / "cf_test_handlers.py").resolve()
    assert lines[:2] == [
        "call targets:",
        f"  flows/groups.yaml:9:15: cf_test_handlers:ok: module cf_test_handlers ({path})",
    ]
    assert lines[2:] == [
        "flows/groups.yaml:6:15: groups.g.routes[0].call: cannot import "
        '"cf_test_nowhere.handlers:run": no module named "cf_test_nowhere"; install it, or put '
        "it in the folder that holds config.yaml",
        "flows/groups.yaml:7:15: groups.g.routes[1].call: cannot import "
        '"cf_test_handlers:missing": module "cf_test_handlers" has no attribute "missing"',
        'flows/groups.yaml:8:15: groups.g.routes[2].call: "cf_test_handlers:value" is not '
        "callable; point call at a function",
    ]


def test_check_imports_reports_a_module_that_raises(project: Project) -> None:
    """A module whose import raises is reported with the error, not a traceback."""
    project.write("cf_test_broken.py", "raise RuntimeError('no config')\n")
    text = group("stream: tasks\nroutes:\n  - call: cf_test_broken:run\n")
    assert project.problems(text, "--check-imports") == [
        'flows/groups.yaml:6:15: groups.g.routes[0].call: cannot import "cf_test_broken:run": '
        "importing it raised RuntimeError: no config"
    ]


def test_without_check_imports_call_targets_are_not_imported(project: Project) -> None:
    """Plain validate never imports user code."""
    project.write("flows/streams.yaml", STREAMS)
    project.write("flows/groups.yaml", group("stream: tasks\nroutes: [{call: cf_nowhere:x}]\n"))
    assert project.run()[0] == 0


# --- output formats -------------------------------------------------------------------


def test_json_format_on_failure(project: Project) -> None:
    """--format json prints valid, files and problems with their fields."""
    project.write("flows/a.yaml", "version: 1\nstreams: {s: {key: k, maxlen: 0}}\n")
    code, out, _ = project.run("--format", "json")
    assert code == 1
    assert json.loads(out) == {
        "valid": False,
        "files": ["config.yaml", "flows/a.yaml"],
        "problems": [
            {
                "file": "flows/a.yaml",
                "line": 2,
                "col": 31,
                "path": "streams.s.maxlen",
                "message": "must be at least 1, got 0",
            }
        ],
    }


def test_json_format_on_success(project: Project) -> None:
    """A valid project in JSON is valid: true with no problems."""
    project.write("flows/a.yaml", "version: 1\n")
    code, out, _ = project.run("--format", "json")
    assert code == 0
    assert json.loads(out) == {
        "valid": True,
        "files": ["config.yaml", "flows/a.yaml"],
        "problems": [],
    }


def test_github_format(project: Project) -> None:
    """--format github prints one ::error annotation per problem, with escaped properties."""
    project.write("flows/a.yaml", "version: 1\nstreams: {s: {key: k, maxlen: 0}}\n")
    code, out, _ = project.run("--format", "github")
    assert code == 1
    assert out == (
        "::error file=flows/a.yaml,line=2,col=31,title=streams.s.maxlen::"
        "flows/a.yaml:2:31: streams.s.maxlen: must be at least 1, got 0\n"
    )


def test_github_format_on_success_prints_nothing(project: Project) -> None:
    """No problems, no annotations."""
    project.write("flows/a.yaml", "version: 1\n")
    assert project.run("--format", "github") == (0, "", "")


def test_config_runner_name_and_admin_port(project: Project) -> None:
    """The runner name and the admin port are checked with readable messages."""
    project.write("config.yaml", "runner: {name: 'my runner'}\nadmin: {listen: 'x:99999'}\n")
    assert project.problems() == [
        'config.yaml:1:16: runner.name: "my runner" is not a valid runner name; use letters, '
        "digits, _ . : and -, starting with a letter or digit",
        'config.yaml:2:17: admin.listen: must be host:port (e.g. 127.0.0.1:8477) or "off" to '
        'disable, got "x:99999"',
    ]


def test_empty_config_means_defaults(project: Project) -> None:
    """An empty config.yaml is all defaults, like a missing one."""
    project.write("config.yaml", "# defaults\n")
    project.write("flows/streams.yaml", STREAMS)
    assert project.run()[0] == 0


def test_config_top_level_list(project: Project) -> None:
    """config.yaml must be a mapping too."""
    project.write("config.yaml", "- redis\n")
    assert project.problems() == [
        "config.yaml:1:1: config file must be a mapping (key: value lines) at the top level, "
        "got a list; write settings as key: value"
    ]


def test_jinja_globals_are_known_names(project: Project) -> None:
    """jinja2's own globals (range, dict, namespace) are not unknown names."""
    project.write("flows/streams.yaml", STREAMS)
    body = (
        "stream: tasks\nroutes:\n  - to: dlq\n    set:\n"
        '      body: "{% for i in range(2) %}{{ i }}{% endfor %}{{ dict(a=1) }}"\n'
    )
    project.write("flows/groups.yaml", group(body))
    assert project.run()[0] == 0


# --- a --config that names no file ----------------------------------------------------


def test_explicit_config_yaml_that_does_not_exist_is_an_error(project: Project) -> None:
    """`--config dir/config.yaml` naming no file fails instead of running on the defaults."""
    project.write("flows/streams.yaml", STREAMS)
    project.write("dir/flows/streams.yaml", STREAMS)
    code, out, _ = project.run("--config", "dir/config.yaml")
    assert code == 1
    assert out.splitlines()[0] == (
        "dir/config.yaml:1:1: config file not found; check the --config path"
    )
    assert project.run("--config", "config.yaml")[0] == 0
    project.root.joinpath("config.yaml").unlink()
    assert project.run("--config", "config.yaml")[0] == 1  # named, so it must exist
    assert project.run()[0] == 0  # not named: ./config.yaml is optional


@pytest.mark.parametrize(
    "command",
    [
        ["graph"],
        ["plan"],
        ["send", "tasks", "{}"],
        ["status"],
        ["dlq", "list"],
        ["run"],
        ["test"],
    ],
)
def test_every_command_refuses_a_missing_config_file(project: Project, command: list[str]) -> None:
    """Every command fails with exit 1 on a named config file that is not there."""
    project.write("flows/streams.yaml", STREAMS)
    project.write("dir/flows/streams.yaml", STREAMS)
    head, *rest = command
    if head == "dlq":
        args = [head, rest[0], "--config", "dir/config.yaml", *rest[1:]]
    else:
        args = [head, "--config", "dir/config.yaml", *rest]
    assert cli(*args) == 1
    out, err = project.capsys.readouterr()
    assert "dir/config.yaml:1:1: config file not found; check the --config path" in out + err
    assert not project.root.joinpath("dir", ".cortex").exists()  # no embedded server started


def test_load_project_without_a_path_reads_config_yaml_when_present(project: Project) -> None:
    """`load_project()` reads ./config.yaml when there is one and uses defaults otherwise."""
    project.write("flows/streams.yaml", STREAMS)
    project.write("config.yaml", "runner: {name: from-file}\n")
    loaded = load_project()
    assert loaded.config.runner.name == "from-file"
    assert loaded.config_path == Path("config.yaml")
    project.root.joinpath("config.yaml").unlink()
    loaded = load_project()
    assert loaded.config_path is None
    assert loaded.base_dir == project.root.resolve()
    with pytest.raises(ValidationFailed, match="config file not found"):
        load_project(Path("config.yaml"))


# --- the summary line -----------------------------------------------------------------


def test_summary_never_counts_problems_in_files_out_of_zero(project: Project) -> None:
    """With nothing read the summary names the files with problems, never "of 0 files"."""
    code, out, _ = project.run("--config", "nope.yaml")
    assert code == 1
    assert out.splitlines() == [
        "flows:1:1: no such flows folder; create it or set flows: in config.yaml",
        "nope.yaml:1:1: config file not found; check the --config path",
        "2 problems in 2 files",
    ]


def test_summary_counts_missing_paths_among_the_files() -> None:
    """A problem in a file that was not read still counts: never "2 of 1 files"."""
    from cortex_flow.errors import Problem
    from cortex_flow.flow.report import summary

    read = Problem("config.yaml", 1, 1, "", "bad")
    missing = Problem("nowhere.yaml", 1, 1, "", "no such file or folder")
    assert summary([read, missing], ["config.yaml"]) == "2 problems in 2 of 2 files"
    assert summary([read], ["config.yaml", "flows/a.yaml"]) == "1 problem in 1 of 2 files"
    assert summary([missing], []) == "1 problem in 1 file"


def test_reload_of_a_project_without_config_file_keeps_the_defaults(project: Project) -> None:
    """A runner started without config.yaml reloads on the defaults (named files must exist)."""
    from cortex_flow.runtime.reload import load_again

    project.write("flows/streams.yaml", STREAMS)
    project.root.joinpath("config.yaml").unlink()
    started = load_project()
    reloaded, _, _ = load_again(started, "cortex")
    assert reloaded.config_path is None and reloaded.config.redis.url == "embedded"
    project.write("config.yaml", "runner: {name: later}\n")
    reloaded, _, _ = load_again(started, "cortex")
    assert reloaded.config.runner.name == "later"


# --- retention ------------------------------------------------------------------------


def test_maxlen_and_retention_max_len_together_is_an_error(project: Project) -> None:
    """maxlen is the old spelling of retention.max_len: both at once is refused."""
    project.write(
        "flows/a.yaml",
        "version: 1\nstreams: {s: {key: k, maxlen: 5, retention: {max_len: 10}}}\n",
    )
    code, out, _ = project.run()
    assert code == 1
    assert out.splitlines()[0] == (
        "flows/a.yaml:2:23: streams.s.maxlen: maxlen is the old spelling of "
        "retention.max_len and both are given; keep retention.max_len and remove maxlen"
    )


def test_retention_takes_a_length_and_an_age(project: Project) -> None:
    """retention: {max_len, max_age} and maxlen with retention.max_age are valid."""
    project.write(
        "flows/a.yaml",
        """
        version: 1
        streams:
          s: {key: k, retention: {max_len: 10, max_age: 1h}}
          t: {key: t, maxlen: 10, retention: {max_age: 30m}}
        """,
    )
    code, out, _ = project.run()
    assert code == 0, out


def test_retention_on_keys_a_message_binds_is_an_error(project: Project) -> None:
    """The retention pass cannot list keys only a message binds: refused, with the why."""
    project.write(
        "flows/a.yaml",
        'version: 1\nstreams: {s: {key: "t:{{ tenant }}", retention: {max_age: 1h}}}\n',
    )
    code, out, _ = project.run()
    assert code == 1
    assert out.splitlines()[0] == (
        'flows/a.yaml:2:49: streams.s.retention: the key "t:{{ tenant }}" has variables only '
        "a message binds (tenant), so the retention pass cannot list its keys to trim; cap a "
        "stream whose keys expand over priority and agent only, or trim these keys yourself"
    )


def test_a2a_declarations_are_checked(project: Project) -> None:
    """a2a: needs a declared stream, at least one skill, and unique skill ids."""
    skill = "{id: s, name: S, description: does s}"
    problems = project.problems(
        "version: 1\nagents:\n"
        f"  a1: {{a2a: {{description: d, stream: taks, skills: [{skill}]}}}}\n"
        "  a2: {a2a: {description: d, stream: tasks, skills: []}}\n"
        f"  a3: {{a2a: {{description: d, stream: tasks, skills: [{skill}, {skill}]}}}}\n"
    )
    assert problems == [
        'flows/groups.yaml:3:38: agents.a1.a2a.stream: stream "taks" is not a declared '
        'stream; did you mean "tasks"?',
        "flows/groups.yaml:4:53: agents.a2.a2a.skills: must not be empty",
        "flows/groups.yaml:5:53: agents.a3.a2a.skills: skill id 's' is given twice; skill "
        "ids are unique",
    ]
