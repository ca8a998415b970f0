"""``cortex-flow dlq list / show / replay / purge`` against a real Redis server."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import redis
from projects import write_project
from redis.asyncio import Redis
from redis_servers import free_port

from cortex_flow.cli import cli
from cortex_flow.ops import dlq as dlq_module
from cortex_flow.ops.dlq import Filters, list_entries

_SEQUENCE = itertools.count()
Sync = Any  # a decoded sync client; redis-py types its replies as bytes | str | None unions


@pytest.fixture
def config(tmp_path: Path, redis_url: str, prefix: str) -> Path:
    """A project with priority task streams, a per-agent inbox and one dead-letter stream."""
    flows = f"""version: 1
streams:
  tasks: {{key: "{prefix}tasks:{{{{ priority }}}}", priorities: [high, low]}}
  inbox: {{key: "{prefix}messages:{{{{ agent }}}}"}}
  dlq: {{key: "{prefix}dlq"}}
agents:
  harold: {{}}
groups:
  agents:
    stream: tasks
    dead_letter: dlq
    routes: [{{drop: true}}]
  harold:
    stream: inbox
    vars: {{agent: harold}}
    dead_letter: dlq
    routes: [{{drop: true}}]
"""
    config = f'redis: {{url: "{redis_url}"}}\nadmin: {{listen: "off"}}\n'
    return write_project(tmp_path, flows, config=config)


def dead_letter(
    r: Sync,
    prefix: str,
    source: str,
    *,
    group: str = "agents",
    error: str = "ValueError: boom",
    age_ms: int = 1000,
    replays: int | None = None,
    **fields: str,
) -> str:
    """Add a dead letter that was dead-lettered ``age_ms`` ago (by the server's clock)."""
    seconds, micros = r.time()
    ms = int(seconds) * 1000 + int(micros) // 1000 - age_ms
    entry_id = f"{ms}-{next(_SEQUENCE)}"  # a rising sequence keeps same-ms IDs increasing
    meta = {
        "dlq_stream": f"{prefix}{source}",
        "dlq_id": "1-1",
        "dlq_group": group,
        "dlq_deliveries": "5",
        "dlq_error": error,
        "dlq_at": "2024-05-01T10:00:00+00:00",
    }
    if replays is not None:
        meta["dlq_replays"] = str(replays)
    added: str = r.xadd(f"{prefix}dlq", {**(fields or {"type": "chat"}), **meta}, id=entry_id)
    return added


def run_json(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert cli("dlq", *args, "--json", "--config", str(config)) == 0
    return json.loads(capsys.readouterr().out)


def ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in entries]


@pytest.fixture
def mixed(r: Sync, prefix: str) -> dict[str, str]:
    """Four dead letters from different sources, groups, errors and ages (oldest first)."""
    return {
        "old": dead_letter(r, prefix, "tasks:high", age_ms=3 * 3600_000, error="Timeout after 5s"),
        "low": dead_letter(r, prefix, "tasks:low", age_ms=600_000, error="KeyError: 'to'"),
        "harold": dead_letter(
            r, prefix, "messages:harold", group="harold", age_ms=60_000, error="timeout"
        ),
        "new": dead_letter(r, prefix, "tasks:high", age_ms=1_000, error="ValueError: boom"),
    }


def test_list_shows_every_entry_oldest_first(
    config: Path, mixed: dict[str, str], prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """list prints a table of all dead letters with source, group and error, oldest first."""
    assert cli("dlq", "list", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert f"{prefix}dlq holds 4 entries; showing 4" in out
    assert out.index(mixed["old"]) < out.index(mixed["new"])
    assert "KeyError: 'to'" in out and f"{prefix}messages:harold" in out
    assert ids(run_json(config, capsys, "list")) == list(mixed.values())


def test_list_json_has_metadata_and_original_fields_apart(
    config: Path, r: Sync, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json gives each entry's dlq_* metadata as fields of its own, the rest under fields."""
    entry_id = dead_letter(r, prefix, "tasks:high", replays=2, to="harold", text="hi")
    [entry] = run_json(config, capsys, "list")
    assert entry == {
        "dlq_key": f"{prefix}dlq",
        "id": entry_id,
        "source": f"{prefix}tasks:high",
        "source_id": "1-1",
        "group": "agents",
        "deliveries": 5,
        "error": "ValueError: boom",
        "at": "2024-05-01T10:00:00+00:00",
        "replays": 2,
        "fields": {"to": "harold", "text": "hi"},
        "not_utf8": [],
    }


def test_list_filters_by_source_group_error_and_age(
    config: Path, mixed: dict[str, str], prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--stream (key or stream name), --group, --error (any case) and ages narrow the list."""
    assert ids(run_json(config, capsys, "list", "--stream", f"{prefix}tasks:high")) == [
        mixed["old"],
        mixed["new"],
    ]
    assert ids(run_json(config, capsys, "list", "--stream", "tasks")) == [
        mixed["old"],
        mixed["low"],
        mixed["new"],
    ]
    assert ids(run_json(config, capsys, "list", "--group", "harold")) == [mixed["harold"]]
    assert ids(run_json(config, capsys, "list", "--error", "TIMEOUT")) == [
        mixed["old"],
        mixed["harold"],
    ]
    assert ids(run_json(config, capsys, "list", "--older-than", "1h")) == [mixed["old"]]
    assert ids(run_json(config, capsys, "list", "--newer-than", "5m")) == [
        mixed["harold"],
        mixed["new"],
    ]
    both = run_json(config, capsys, "list", "--older-than", "30s", "--newer-than", "1h")
    assert ids(both) == [mixed["low"], mixed["harold"]]
    assert ids(run_json(config, capsys, "list", mixed["low"], mixed["new"])) == [
        mixed["low"],
        mixed["new"],
    ]


def test_list_with_no_match_says_so(
    config: Path, mixed: dict[str, str], prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A filter that matches nothing prints the stream's size and that none match."""
    assert cli("dlq", "list", "--group", "nobody", "--config", str(config)) == 0
    assert capsys.readouterr().out.strip() == f"{prefix}dlq holds 4 entries; none match"


def test_bad_arguments_are_usage_errors(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed ID or duration exits 2 with the reason."""
    assert cli("dlq", "show", "abc", "--config", str(config)) == 2
    assert "abc: not a stream entry ID" in capsys.readouterr().err
    assert cli("dlq", "list", "--older-than", "soon", "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert err.startswith("--older-than: ") and "soon" in err and "is not a duration" in err


def test_show_prints_every_field(
    config: Path, r: Sync, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """show prints the metadata, the full error and every original field of one entry."""
    error = "Traceback (most recent call last):\n  ...\nRuntimeError: " + "x" * 150
    entry_id = dead_letter(r, prefix, "tasks:low", error=error, to="harold", text="hello")
    assert cli("dlq", "show", entry_id, "--config", str(config)) == 0
    out = capsys.readouterr().out
    for text in (entry_id, f"{prefix}tasks:low", "RuntimeError: " + "x" * 150, "hello", "harold"):
        assert text in out
    shown = run_json(config, capsys, "show", entry_id)
    assert (shown["id"], shown["fields"]) == (entry_id, {"to": "harold", "text": "hello"})


def test_show_missing_id_exits_1(
    config: Path, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """show with an ID that is not in the dead-letter stream exits 1 and says where it looked."""
    assert cli("dlq", "show", "1-0", "--config", str(config)) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: no entry 1-0 in {prefix}dlq")
    assert "Traceback" not in captured.err


def test_replay_restores_the_original_message(
    config: Path, r: Sync, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """replay publishes the original fields plus dlq_replays=1 to the source and removes it."""
    entry_id = dead_letter(r, prefix, "tasks:high", to="harold", text="hi")
    assert cli("dlq", "replay", entry_id, "--config", str(config)) == 0
    assert capsys.readouterr().out.startswith(f"replayed 1 entry: 1 to {prefix}tasks:high")
    [(_, fields)] = r.xrange(f"{prefix}tasks:high")
    assert fields == {"to": "harold", "text": "hi", "dlq_replays": "1"}
    assert r.xlen(f"{prefix}dlq") == 0


def test_show_and_replay_an_entry_that_is_not_utf8(
    config: Path, r: Sync, redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """show prints bytes that are not UTF-8 as \\xNN and names the field; replay publishes
    the original bytes (on the previous main both failed with UnicodeDecodeError)."""
    fields: dict[bytes, bytes] = {b"text": b"\xff\xfeok", b"n\xe9": b"1"}
    fields |= {b"dlq_stream": f"{prefix}tasks:high".encode(), b"dlq_group": b"agents"}
    with redis.Redis.from_url(redis_url) as raw:
        entry_id = raw.xadd(f"{prefix}dlq", fields).decode()
        assert cli("dlq", "show", entry_id, "--config", str(config)) == 0
        out = capsys.readouterr().out
        assert "\\xff\\xfeok" in out and "n\\xe9" in out and "not UTF-8" in out
        assert cli("dlq", "list", "--config", str(config)) == 0
        assert "text=\\xff\\xfeok" in capsys.readouterr().out
        shown = run_json(config, capsys, "show", entry_id)
        assert shown["fields"] == {"text": "\\xff\\xfeok", "n\\xe9": "1"}
        assert shown["not_utf8"] == ["text", "n\\xe9"]
        assert cli("dlq", "replay", entry_id, "--config", str(config)) == 0
        [(_, fields)] = raw.xrange(f"{prefix}tasks:high")
        assert fields == {b"text": b"\xff\xfeok", b"n\xe9": b"1", b"dlq_replays": b"1"}
        assert raw.xlen(f"{prefix}dlq") == 0


def test_replay_counts_earlier_replays(
    config: Path, r: Sync, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An entry that was replayed before goes back with its replay count increased."""
    dead_letter(r, prefix, "messages:harold", group="harold", replays=2)
    assert cli("dlq", "replay", "--group", "harold", "--config", str(config)) == 0
    [(_, fields)] = r.xrange(f"{prefix}messages:harold")
    assert fields == {"type": "chat", "dlq_replays": "3"}


def test_replay_dry_run_changes_nothing(
    config: Path,
    mixed: dict[str, str],
    r: Sync,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """replay --dry-run says what would go where and leaves both streams untouched."""
    assert cli("dlq", "replay", "--dry-run", "--stream", "tasks", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert f"would replay 3 entries: 2 to {prefix}tasks:high, 1 to {prefix}tasks:low" in out
    assert r.xlen(f"{prefix}dlq") == 4
    assert not r.exists(f"{prefix}tasks:high", f"{prefix}tasks:low")


def test_replay_of_unknown_id_does_nothing(
    config: Path,
    mixed: dict[str, str],
    r: Sync,
    capsys: pytest.CaptureFixture[str],
    prefix: str,
) -> None:
    """replay naming an ID that is not there exits 1 and replays none of the others either."""
    assert cli("dlq", "replay", mixed["old"], "1-0", "--config", str(config)) == 1
    assert "1-0 not found" in capsys.readouterr().err
    assert r.xlen(f"{prefix}dlq") == 4


def test_replay_many_entries_in_batches(
    config: Path, r: Sync, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replaying more entries than one batch moves every one of them exactly once."""
    pipe = r.pipeline()
    for n in range(250):
        pipe.xadd(f"{prefix}dlq", {"n": str(n), "dlq_stream": f"{prefix}tasks:low"})
    pipe.execute()
    assert cli("dlq", "replay", "--config", str(config)) == 0
    assert "replayed 250 entries" in capsys.readouterr().out
    replayed = [fields["n"] for _, fields in r.xrange(f"{prefix}tasks:low")]
    assert replayed == [str(n) for n in range(250)]
    assert r.xlen(f"{prefix}dlq") == 0


def test_replay_skips_an_entry_without_source(
    config: Path, r: Sync, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An entry that does not say where it came from stays in the DLQ and exits 1."""
    entry_id = r.xadd(f"{prefix}dlq", {"type": "chat"})
    assert cli("dlq", "replay", "--config", str(config)) == 1
    assert f"skipped {entry_id}: it has no dlq_stream field" in capsys.readouterr().out
    assert r.xlen(f"{prefix}dlq") == 1


def test_purge_deletes_the_selected_entries(
    config: Path,
    mixed: dict[str, str],
    r: Sync,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """purge with a filter deletes exactly the matching entries."""
    assert cli("dlq", "purge", "--error", "timeout", "--yes", "--config", str(config)) == 0
    assert capsys.readouterr().out.startswith(f"purged 2 entries: 2 from {prefix}dlq")
    assert [i for i, _ in r.xrange(f"{prefix}dlq")] == [mixed["low"], mixed["new"]]


def test_purge_dry_run_changes_nothing(
    config: Path,
    mixed: dict[str, str],
    r: Sync,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """purge --dry-run reports what would be deleted and deletes nothing."""
    assert cli("dlq", "purge", "--dry-run", mixed["old"], "--config", str(config)) == 0
    assert capsys.readouterr().out.startswith(f"would purge 1 entry: 1 from {prefix}dlq")
    assert r.xlen(f"{prefix}dlq") == 4


def test_purge_everything_needs_yes(
    config: Path,
    mixed: dict[str, str],
    r: Sync,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """purge without a terminal to ask on refuses (exit 2) unless --yes is given."""
    assert cli("dlq", "purge", "--config", str(config)) == 2
    assert "pass --yes to confirm" in capsys.readouterr().err
    assert r.xlen(f"{prefix}dlq") == 4
    assert cli("dlq", "purge", "--yes", "--config", str(config)) == 0
    assert r.xlen(f"{prefix}dlq") == 0


def test_purge_asks_first_on_a_terminal(
    config: Path,
    mixed: dict[str, str],
    r: Sync,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """purge asks before deleting, even with filters: "n" keeps everything, "y" deletes;
    without a terminal it refuses, naming how many would go."""
    assert cli("dlq", "purge", mixed["old"], "--config", str(config)) == 2
    assert f"purge 1 dead letter from {prefix}dlq? This cannot be undone." in (
        capsys.readouterr().err
    )
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    answers = iter(["n", "y"])
    asked: list[str] = []

    def answer(question: str) -> str:
        asked.append(question)
        return next(answers)

    monkeypatch.setattr("builtins.input", answer)
    assert cli("dlq", "purge", mixed["old"], "--config", str(config)) == 1
    assert r.xlen(f"{prefix}dlq") == 4
    assert cli("dlq", "purge", mixed["old"], "--config", str(config)) == 0
    assert r.xlen(f"{prefix}dlq") == 3
    assert asked == [f"purge 1 dead letter from {prefix}dlq? This cannot be undone. [y/N] "] * 2


@pytest.fixture
def huge(r: Sync, prefix: str) -> list[str]:
    """5,000 dead letters; every 1,000th has a rare error."""
    pipe = r.pipeline()
    for n in range(5000):
        error = "rare failure" if n % 1000 == 999 else "common failure"
        pipe.xadd(f"{prefix}dlq", {"n": str(n), "dlq_error": error, "dlq_stream": "x"})
    return [str(i) for i in pipe.execute()]


def test_huge_dlq_list_with_limit(
    config: Path, huge: list[str], capsys: pytest.CaptureFixture[str], prefix: str
) -> None:
    """--limit 10 on 5,000 entries shows the 10 oldest; a rare filter pages on to find matches."""
    assert ids(run_json(config, capsys, "list", "--limit", "10")) == huge[:10]
    rare = run_json(config, capsys, "list", "--error", "rare", "--limit", "3")
    assert ids(rare) == [huge[999], huge[1999], huge[2999]]
    assert cli("dlq", "list", "--limit", "10", "--config", str(config)) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head == f"{prefix}dlq holds 5,000 entries; showing the oldest 10 (--limit 10)"


async def test_limit_reads_one_page(
    huge: list[str], prefix: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limit within the first page costs one XRANGE of at most one page, not the whole stream."""
    client = Redis.from_url(redis_url, decode_responses=True)
    calls: list[int | None] = []
    real = client.xrange

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("count"))
        return await real(*args, **kwargs)

    monkeypatch.setattr(client, "xrange", counting)
    try:
        entries = await list_entries(client, [f"{prefix}dlq"], Filters(limit=10))
    finally:
        await client.aclose()
    assert [e.id for e in entries] == huge[:10]
    assert calls == [dlq_module.PAGE]


def test_redis_down_exits_1_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With Redis unreachable, dlq commands exit 1 with one sentence naming the URL."""
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "f.yaml").write_text(
        "version: 1\nstreams:\n  a: {key: a}\n  dlq: {key: d}\n"
        "groups:\n  g: {stream: a, dead_letter: dlq, routes: [{drop: true}]}\n"
    )
    url = f"redis://127.0.0.1:{free_port()}"
    (tmp_path / "config.yaml").write_text(f'redis: {{url: "{url}"}}\n')
    assert cli("dlq", "list", "--config", str(tmp_path / "config.yaml")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach Redis at {url}") and "Traceback" not in err


def test_replay_to_a_key_several_groups_read_needs_yes(
    tmp_path: Path, redis_url: str, r: Sync, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replaying to a key that more groups read warns and needs --yes (dry runs do not)."""
    flows = f"""version: 1
streams:
  tasks: {{key: "{prefix}tasks:{{{{ priority }}}}", priorities: [high, low]}}
  inbox: {{key: "{prefix}messages:{{{{ agent }}}}"}}
  dlq: {{key: "{prefix}dlq"}}
agents:
  harold: {{}}
groups:
  agents: {{stream: tasks, dead_letter: dlq, routes: [{{drop: true}}]}}
  audit: {{stream: tasks, routes: [{{drop: true}}]}}
  harold: {{stream: inbox, vars: {{agent: harold}}, dead_letter: dlq, routes: [{{drop: true}}]}}
"""
    config = write_project(
        tmp_path, flows, config=f'redis: {{url: "{redis_url}"}}\nadmin: {{listen: "off"}}\n'
    )
    shared = dead_letter(r, prefix, "tasks:high")
    warning = (
        f"{prefix}tasks:high is read by groups agents, audit: replaying delivers it to all "
        "of them; pass --yes to confirm"
    )
    assert cli("dlq", "replay", "--config", str(config)) == 2
    assert warning in capsys.readouterr().err
    assert r.xlen(f"{prefix}dlq") == 1 and not r.exists(f"{prefix}tasks:high")

    assert cli("dlq", "replay", "--dry-run", "--config", str(config)) == 0
    captured = capsys.readouterr()
    assert f"warning: {warning}" in captured.err
    assert "would replay 1 entry" in captured.out
    assert r.xlen(f"{prefix}dlq") == 1 and not r.exists(f"{prefix}tasks:high")

    assert cli("dlq", "replay", shared, "--yes", "--config", str(config)) == 0
    captured = capsys.readouterr()
    assert "warning: " + warning.removesuffix("; pass --yes to confirm") + "\n" == captured.err
    assert r.xlen(f"{prefix}tasks:high") == 1 and r.xlen(f"{prefix}dlq") == 0

    dead_letter(r, prefix, "messages:harold", group="harold")  # one reader: no question
    assert cli("dlq", "replay", "--config", str(config)) == 0
    assert capsys.readouterr().err == ""
    assert r.xlen(f"{prefix}messages:harold") == 1
