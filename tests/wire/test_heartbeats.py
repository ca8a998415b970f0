"""The heartbeat format and the newest-beat scan shared by runner, client and status."""

from __future__ import annotations

import json

import fakeredis
import pytest

from cortex_flow.wire.heartbeats import (
    LatestBeats,
    beat_fields,
    encode_beat,
    latest_beats,
    parse_beat,
)


@pytest.mark.parametrize("codec", ["raw", "json"])
def test_a_beat_reads_back_through_its_codec(codec: str) -> None:
    """What ``encode_beat`` writes, ``parse_beat`` reads, in either codec."""
    entry = encode_beat(codec, beat_fields("harold", "runner", "busy", instance="h:1:2"))
    beat = parse_beat(codec, "1700000000000-0", entry)
    assert beat is not None
    assert (beat.agent, beat.kind, beat.status, beat.instance) == (
        "harold",
        "runner",
        "busy",
        "h:1:2",
    )


def test_plain_fields_in_a_json_stream_are_still_a_beat() -> None:
    """An agent that beats plain fields into a ``codec: json`` stream is still seen."""
    beat = parse_beat("json", "1700000000000-0", {"agent": "scout", "ts": "1700000000500"})
    assert beat is not None and beat.agent == "scout" and beat.ts == 1700000000.5


def test_entries_that_are_not_beats_are_skipped() -> None:
    """No agent, an undecodable JSON entry or a JSON non-object is not a beat."""
    assert parse_beat("raw", "1-0", {"status": "ok"}) is None
    assert parse_beat("json", "1-0", {"data": "{not json"}) is None
    assert parse_beat("json", "1-0", {"data": json.dumps([1, 2])}) is None


def test_missing_ts_falls_back_to_the_entry_id() -> None:
    """A beat without ``ts`` is dated by its entry ID."""
    beat = parse_beat("raw", "1700000001000-0", {"agent": "a"})
    assert beat is not None and beat.ts == 1700000001.0


def test_newest_beat_of_each_agent_and_runner_instance_wins() -> None:
    """Older beats of an agent or of one runner instance never replace newer ones."""
    latest = LatestBeats()
    for entry_id, fields in [
        ("3-0", beat_fields("a", status="late")),
        ("2-0", {"agent": "a", "ts": "1", "status": "early"}),
        ("2-1", {"agent": "r", "kind": "runner", "instance": "h:1:1", "ts": "5"}),
        ("2-2", {"agent": "r", "kind": "runner", "instance": "h:2:1", "ts": "9"}),
    ]:
        beat = parse_beat("raw", entry_id, fields)
        assert beat is not None
        latest.add(beat)
    assert latest.agents["a"].status == "late"
    assert set(latest.runners["r"]) == {"h:1:1", "h:2:1"}
    newest = latest.runner("r")
    assert newest is not None and newest.instance == "h:2:1"


async def test_scan_pages_back_until_every_wanted_agent_is_found() -> None:
    """An agent whose beat is older than several pages is found; the scan stops there."""
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    await client.xadd("hb", encode_beat("json", beat_fields("old")))
    for _ in range(2_500):
        await client.xadd("hb", encode_beat("json", beat_fields("chatty")))
    latest = await latest_beats(client, "hb", "json", wanted={"old", "chatty"})
    assert set(latest.agents) == {"old", "chatty"}
    assert latest.scanned == 2_501
    newest = (await client.xrevrange("hb", count=1))[0][0]
    assert latest.newest_id == newest
    bounded = await latest_beats(client, "hb", "json", wanted={"old"}, limit=1_000)
    assert set(bounded.agents) == {"chatty"} and bounded.scanned == 1_000
