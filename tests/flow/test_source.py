"""Safe YAML reading: data, positions, and every way a file can be refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cortex_flow.errors import Problem, ValidationFailed
from cortex_flow.flow import source
from cortex_flow.flow.source import MAX_BYTES, Document, format_path, load_yaml

FILE = "flows/a.yaml"
LOADERS = ["python"] + (["libyaml"] if hasattr(yaml, "CSafeLoader") else [])

FLOW = """\
# yaml-language-server: $schema=../schemas/flow.schema.json
version: 1
streams:
  tasks:
    key: "cortex:tasks:{{ priority }}"
    priorities: [critical, high, normal, low]
agents:
  harold:
    heartbeat: {interval: 30s}
groups:
  agents:
    stream: tasks
    routes:
      - when: "msg.to in agents"
        to: inbox
      - call: workers.batch:run
"""


@pytest.fixture(params=LOADERS)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test with the pure-Python parser and, when installed, with libyaml."""
    chosen = yaml.SafeLoader if request.param == "python" else yaml.CSafeLoader
    monkeypatch.setattr(source, "_Loader", chosen)
    yield request.param


def load(text: str, **env: str) -> Document:
    return load_yaml(FILE, text=text, env=env)


def problems(text: str, **env: str) -> list[Problem]:
    with pytest.raises(ValidationFailed) as failed:
        load(text, **env)
    return failed.value.problems


def problem(line: int, col: int, message: str, path: str = "") -> Problem:
    return Problem(FILE, line, col, path, message)


def test_flow_file_loads_as_plain_data(loader: str) -> None:
    """A flow file becomes plain dicts, lists and scalars."""
    assert load(FLOW).data == {
        "version": 1,
        "streams": {
            "tasks": {
                "key": "cortex:tasks:{{ priority }}",
                "priorities": ["critical", "high", "normal", "low"],
            }
        },
        "agents": {"harold": {"heartbeat": {"interval": "30s"}}},
        "groups": {
            "agents": {
                "stream": "tasks",
                "routes": [
                    {"when": "msg.to in agents", "to": "inbox"},
                    {"call": "workers.batch:run"},
                ],
            }
        },
    }


def test_locate_gives_the_value_position_of_nested_nodes(loader: str) -> None:
    """locate() gives the 1-based line and column of values in mappings, lists and flows."""
    doc = load(FLOW)
    assert doc.locate(["version"]) == (2, 10)
    assert doc.locate(["streams", "tasks"]) == (5, 5)
    assert doc.locate(["streams", "tasks", "key"]) == (5, 10)
    assert doc.locate(("streams", "tasks", "priorities", 2)) == (6, 34)
    assert doc.locate(["agents", "harold", "heartbeat", "interval"]) == (9, 27)
    assert doc.locate(["groups", "agents", "routes", 0]) == (14, 9)
    assert doc.locate(["groups", "agents", "routes", 1, "call"]) == (16, 15)


def test_locate_of_a_missing_key_points_at_the_parent_mapping() -> None:
    """A path into a key that does not exist points at the nearest existing parent."""
    doc = load(FLOW)
    assert doc.locate(["agents", "harold", "heartbeat", "timeout"]) == (9, 16)
    assert doc.locate(["groups", "agents", "routes", 5, "to"]) == (14, 7)


def test_locate_of_the_empty_or_unknown_path_is_the_file_start() -> None:
    """The empty path, and a path with no existing prefix, are at line 1, column 1."""
    doc = load(FLOW)
    assert doc.locate([]) == (1, 1)
    assert doc.locate(["nope", "deeper"]) == (1, 1)


def test_key_position_gives_the_key_token() -> None:
    """key_position() gives where the key of a mapping entry is written."""
    doc = load(FLOW)
    assert doc.key_position(["streams", "tasks", "priorities"]) == (6, 5)
    assert doc.key_position(["agents", "harold", "heartbeat", "interval"]) == (9, 17)
    assert doc.key_position(["groups", "agents", "routes", 1]) == (16, 9)  # no key: the value


def test_paths_below_an_alias_point_at_the_alias() -> None:
    """Values reached through an alias are located at the alias itself."""
    doc = load("a: &x {b: [1, 2]}\nc: *x\n")
    assert doc.data == {"a": {"b": [1, 2]}, "c": {"b": [1, 2]}}
    assert doc.locate(["c", "b", 1]) == (2, 4)
    assert doc.locate(["a", "b", 1]) == (1, 15)


def test_an_alias_is_a_copy_of_its_anchor() -> None:
    """Changing the value of an alias does not change its anchor."""
    data = load("a: &x {b: [1]}\nc: *x\n").data
    data["c"]["b"].append(2)
    assert data["a"] == {"b": [1]}


def test_mapping_keys_are_the_text_as_written() -> None:
    """Keys are strings spelled as in the file: 200 is "200", on is "on", null is "null"."""
    assert load("200: a\non: b\nnull: c\n1.50: d\n'x': e\n").data == {
        "200": "a",
        "on": "b",
        "null": "c",
        "1.50": "d",
        "x": "e",
    }


def test_scalar_values_follow_yaml_1_1_except_timestamps(loader: str) -> None:
    """Values resolve as yaml.safe_load does, but timestamps stay strings."""
    text = "a: 0x10\nb: 1_000\nc: 1.5\nd: yes\ne: ~\nf: '12'\ng: 2024-01-01\nh: !!str 5\ni: .inf\n"
    assert load(text).data == {
        "a": 16,
        "b": 1000,
        "c": 1.5,
        "d": True,
        "e": None,
        "f": "12",
        "g": "2024-01-01",
        "h": "5",
        "i": float("inf"),
    }


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # and another\n", "---\n"])
def test_an_empty_file_gives_none(text: str) -> None:
    """An empty file, or comments only, loads as None (the caller reports it)."""
    assert load(text).data is None


def test_a_top_level_list_or_scalar_is_returned_as_is() -> None:
    """The loader does not judge the top level; the caller does."""
    assert load("- a\n- b\n").data == ["a", "b"]
    assert load("hello\n").data == "hello"


def test_a_duplicate_key_is_reported_at_the_second_key(loader: str) -> None:
    """A key repeated in a mapping is a problem at the repeat, naming the first line."""
    text = "groups:\n  agents:\n    stream: a\n    batch: 1\n    stream: b\n"
    assert problems(text) == [
        problem(5, 5, 'duplicate key "stream" (first defined at line 3)', "groups.agents.stream")
    ]


def test_duplicate_keys_are_all_reported_together() -> None:
    """Every duplicate key of the file is reported in one error, quoted or not."""
    assert problems("a: 1\n'a': 2\nb: {x: 1, x: 2}\n") == [
        problem(2, 1, 'duplicate key "a" (first defined at line 1)', "a"),
        problem(3, 11, 'duplicate key "x" (first defined at line 3)', "b.x"),
    ]


def test_a_syntax_error_gives_the_parser_message_and_place(loader: str) -> None:
    """A syntax error is one problem at the parser's line:col, worded alike by both parsers."""
    assert problems("streams:\n  tasks: key: x\n") == [
        problem(2, 13, "could not parse YAML: mapping values are not allowed here")
    ]


def test_a_syntax_error_names_its_context(loader: str) -> None:
    """A syntax error with a context says where that context started."""
    message = (
        "could not parse YAML: found unexpected end of stream "
        "(while scanning a quoted scalar at line 2, column 8)"
    )
    assert problems("a: 1\nb: [x, 'open\n") == [problem(3, 1, message)]


def test_a_control_character_is_a_problem(loader: str) -> None:
    """Non-printable characters are refused at their place."""
    assert problems("a: 1\nb: x\x07\n") == [
        problem(
            2,
            5,
            "could not parse YAML: unacceptable character #x0007: "
            "special characters are not allowed",
        )
    ]


@pytest.mark.parametrize(
    ("text", "shown", "col"),
    [
        ("a: !!binary aGk=\n", "!!binary", 4),
        ("a: !!timestamp 2024-01-01\n", "!!timestamp", 4),
        ("a: !!set {x}\n", "!!set", 4),
        ("a: !!python/name:os.system x\n", "!!python/name:os.system", 4),
        ("a: !env HOME\n", "!env", 4),
    ],
)
def test_tags_beyond_plain_values_are_problems(text: str, shown: str, col: int) -> None:
    """Only the standard scalar, map and seq tags are accepted."""
    message = (
        f"unsupported YAML tag {shown}; use plain mappings, lists and scalars "
        "(!!str, !!int, !!float, !!bool and !!null are allowed)"
    )
    assert problems(text) == [problem(1, col, message, "a")]


def test_an_explicit_tag_that_does_not_fit_is_a_problem() -> None:
    """!!int on text that is not an integer is reported with the value."""
    assert problems("retry:\n  max: !!int five\n") == [
        problem(2, 8, '"five" is not a valid !!int', "retry.max")
    ]


def test_merge_keys_are_refused() -> None:
    """<< merge keys are not supported and say so."""
    text = "base: &b {a: 1}\ngroup:\n  <<: *b\n"
    assert problems(text) == [
        problem(3, 3, "merge keys (<<) are not supported; write the keys out")
    ]


def test_a_collection_as_key_is_a_problem() -> None:
    """A mapping or list used as a key is refused at the key."""
    message = "mapping keys must be plain text, not a mapping or a list"
    assert problems("groups:\n  ? [a, b]\n  : 1\n") == [problem(2, 5, message, "groups")]


def test_several_documents_are_refused() -> None:
    """A second --- document in one file is a problem at its start."""
    assert problems("a: 1\n---\nb: 2\n") == [
        problem(2, 1, "file holds more than one YAML document; keep one per file")
    ]


def test_an_alias_without_anchor_is_a_problem() -> None:
    """*name with no &name before it is reported."""
    assert problems("a: [*nope]\n") == [
        problem(1, 5, "alias *nope refers to no anchor defined before it")
    ]


def test_a_recursive_alias_is_a_problem() -> None:
    """An alias inside the node its anchor names is refused, not built as a cycle."""
    assert problems("a: &x [1, *x]\n") == [
        problem(1, 11, "alias *x refers to its own enclosing node")
    ]


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused(loader: str) -> None:
    """Aliases that would expand past MAX_NODES nodes are refused as soon as they would."""
    # a5 is the first level past 100,000 nodes: 9**5 scalars and their lists
    assert problems(billion_laughs()) == [
        problem(6, 10, "document expands to more than 100000 nodes (YAML aliases?)")
    ]


def test_aliases_within_the_limit_are_expanded() -> None:
    """A small alias tree loads, fully expanded."""
    data = load(billion_laughs(levels=3, width=3)).data
    assert data["a2"] == [[["lol"] * 3] * 3] * 3


def test_deep_flow_nesting_is_refused(loader: str) -> None:
    """100,000 nested [ are refused at the 65th, without recursion or a slow scan."""
    assert problems("[" * 100_000 + "]" * 100_000) == [
        problem(1, 65, "document nests deeper than 64 levels")
    ]


def test_moderately_deep_flow_nesting_is_refused_at_the_limit(loader: str) -> None:
    """100 nested flow lists are refused at the 65th level."""
    assert problems("a: " + "[" * 100 + "]" * 100) == [
        problem(1, 67, "document nests deeper than 64 levels")
    ]


def test_deep_block_nesting_is_refused(loader: str) -> None:
    """100,000 nested block lists on one line are refused at the 65th."""
    assert problems("- " * 100_000 + "x\n") == [
        problem(1, 129, "document nests deeper than 64 levels")
    ]


def test_nesting_at_the_limit_is_accepted() -> None:
    """64 levels of nesting load."""
    data: Any = load("[" * 64 + "]" * 64).data
    for _ in range(63):
        data = data[0]
    assert data == []


def test_a_file_over_the_size_limit_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A 50 MiB file is refused from its size, with the size in the message."""
    big = tmp_path / "big.yaml"
    with big.open("wb") as stream:
        stream.truncate(50 * 1024 * 1024)
    with pytest.raises(ValidationFailed) as failed:
        load_yaml(big, display="flows/big.yaml")
    assert failed.value.problems == [
        Problem("flows/big.yaml", 1, 1, "", "file is 52.4 MB; flow files are limited to 10 MiB")
    ]


def test_a_file_just_under_the_size_limit_is_read(tmp_path: Path) -> None:
    """MAX_BYTES itself is allowed."""
    path = tmp_path / "edge.yaml"
    path.write_bytes(b"a: 1\n" + b"#" * (MAX_BYTES - 6) + b"\n")
    assert load_yaml(path).data == {"a": 1}


def test_binary_garbage_is_refused(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are refused with the byte and its offset."""
    path = tmp_path / "garbage.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ValidationFailed) as failed:
        load_yaml(path, display="flows/garbage.yaml")
    assert failed.value.problems == [
        Problem("flows/garbage.yaml", 1, 1, "", "file is not UTF-8 text (byte 0x89 at offset 0)")
    ]


def test_non_utf8_text_is_refused_at_its_line(tmp_path: Path) -> None:
    """Latin-1 text is refused at the line and column of the first bad byte."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\nname: café\n".encode("latin-1"))
    with pytest.raises(ValidationFailed) as failed:
        load_yaml(path)
    assert failed.value.problems == [
        Problem(str(path), 2, 10, "", "file is not UTF-8 text (byte 0xe9 at offset 20)")
    ]


def test_a_nul_byte_is_refused_as_binary(tmp_path: Path) -> None:
    """A NUL byte, valid UTF-8 but never text, is refused at its place."""
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"a: 1\nb: \x00\n")
    with pytest.raises(ValidationFailed) as failed:
        load_yaml(path, display="n.yaml")
    assert failed.value.problems == [
        Problem("n.yaml", 2, 4, "", "file is binary, not text (byte 0x00 at offset 8)")
    ]


def test_given_text_is_checked_for_nul_too() -> None:
    """The text= argument gets the same binary check as a file."""
    assert problems("a: \x00") == [
        problem(1, 4, "file is binary, not text (byte 0x00 at offset 3)")
    ]


def test_an_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    """A file that cannot be opened is a problem of that file, not a crash."""
    with pytest.raises(ValidationFailed) as failed:
        load_yaml(tmp_path / "missing.yaml", display="flows/missing.yaml")
    assert failed.value.problems == [
        Problem("flows/missing.yaml", 1, 1, "", "cannot read file: No such file or directory")
    ]


def test_a_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    """A UTF-8 BOM at the start of the file is skipped."""
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfversion: 1\n")
    assert load_yaml(path).data == {"version": 1}


def test_file_name_defaults_to_the_path_as_given(tmp_path: Path) -> None:
    """Without display=, problems name the path as it was passed in."""
    path = tmp_path / "dup.yaml"
    path.write_text("a: 1\na: 2\n")
    with pytest.raises(ValidationFailed) as failed:
        load_yaml(str(path))
    assert failed.value.problems[0].file == str(path)


def test_environment_is_interpolated_before_parsing() -> None:
    """${VAR} values are typed by YAML after interpolation: a port becomes an int."""
    assert load("port: ${PORT}\nhost: ${HOST:-localhost}\n", PORT="8080").data == {
        "port": 8080,
        "host": "localhost",
    }


def test_missing_environment_variables_are_reported_together() -> None:
    """All unset variables are reported in one error, at their place in the file."""
    text = "redis:\n  url: ${CORTEX_REDIS_URL}\n  password: ${CORTEX_TOKEN}\n# ${IN_COMMENT}\n"
    assert [(p.line, p.col, p.message.split(" is ")[0]) for p in problems(text)] == [
        (2, 8, "environment variable CORTEX_REDIS_URL"),
        (3, 13, "environment variable CORTEX_TOKEN"),
    ]


def test_the_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without env=, variables come from the process environment."""
    monkeypatch.setenv("CORTEX_TEST_NAME", "box1")
    assert load_yaml(FILE, text="name: ${CORTEX_TEST_NAME}\n").data == {"name": "box1"}


def test_format_path_writes_dotted_paths_with_indexes() -> None:
    """Paths read as groups.agents.routes[0].to in problems."""
    assert format_path(("groups", "agents", "routes", 0, "to")) == "groups.agents.routes[0].to"
    assert format_path(()) == ""
    assert format_path((0, "a")) == "[0].a"
