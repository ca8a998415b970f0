"""The heartbeat format, and the one scan for the newest beat of each agent and runner.

A beat is ``{agent: NAME, kind: agent|runner, status: ok|stopped|..., ts: EPOCH_MS}``;
a runner's also carries ``instance`` (``host:pid:start_ms``). It is written and read
through the heartbeat stream's codec, by the runner, the agents' client and ``status``
alike. A plain-fields entry in a ``codec: json`` stream (an agent written in another
language that beats with plain fields) is still read as a beat.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cortex_flow.wire.codec import DecodeError, check_text, decode, encode
from cortex_flow.wire.duties import FENCE_CHECK, Fence, fenced_call
from cortex_flow.wire.entryids import id_ms

SCAN_LIMIT = 10_000  # heartbeat entries read back at most, newest first
PAGE = 1_000


@dataclass(frozen=True)
class Beat:
    """One heartbeat entry, decoded."""

    entry_id: str
    agent: str
    kind: str  # "agent" or "runner"
    status: str
    ts: float  # seconds: the beater's clock (``ts``), else the entry ID's
    instance: str | None = None


def beat_fields(
    name: str, kind: str = "agent", status: str = "ok", instance: str | None = None
) -> dict[str, str]:
    """A heartbeat's fields; a runner's carries its ``instance`` (``host:pid:start_ms``)."""
    fields = {"agent": name, "kind": kind, "status": status, "ts": str(int(time.time() * 1000))}
    if instance is not None:
        fields["instance"] = instance
    return fields


def encode_beat(codec: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The entry to XADD for a beat in a stream of ``codec``."""
    return encode(codec, fields)


def parse_beat(codec: str, entry_id: str, raw: Mapping[str, Any]) -> Beat | None:
    """A heartbeat entry decoded with the stream's codec; None if it is not a beat
    (a field that is not UTF-8 included)."""
    fields: Mapping[str, Any] | None = None
    try:
        check_text(raw)
    except DecodeError:
        return None
    if codec != "raw":
        try:
            decoded = decode(codec, dict(raw))
        except DecodeError:
            decoded = None
        if isinstance(decoded, Mapping):
            fields = decoded
    if fields is None or "agent" not in fields:
        fields = raw if "agent" in raw else None
    if fields is None or not fields.get("agent"):
        return None
    try:
        ts = int(fields["ts"]) / 1000
    except (KeyError, TypeError, ValueError):
        ts = id_ms(entry_id) / 1000
    instance = fields.get("instance")
    return Beat(
        entry_id=entry_id,
        agent=str(fields["agent"]),
        kind=str(fields.get("kind") or "agent"),
        status=str(fields.get("status") or "ok"),
        ts=ts,
        instance=str(instance) if instance else None,
    )


@dataclass
class LatestBeats:
    """The newest beat of each agent, and of each runner instance, found by one scan."""

    agents: dict[str, Beat] = field(default_factory=dict)
    runners: dict[str, dict[str, Beat]] = field(default_factory=dict)  # name -> instance ->
    newest_id: str | None = None  # the newest entry of the stream (where to read on from)
    scanned: int = 0

    def runner(self, name: str) -> Beat | None:
        """The newest beat of any instance of runner ``name``."""
        beats = self.runners.get(name)
        return max(beats.values(), key=lambda b: b.ts) if beats else None

    def add(self, beat: Beat) -> None:
        """Keep ``beat`` unless a newer one of the same agent or instance is known."""
        if beat.kind == "runner":
            seen = self.runners.setdefault(beat.agent, {})
            known = seen.get(beat.instance or "")
            if known is None or beat.ts > known.ts:
                seen[beat.instance or ""] = beat
            return
        known = self.agents.get(beat.agent)
        if known is None or beat.ts > known.ts:
            self.agents[beat.agent] = beat


async def latest_beats(
    client: Any,
    key: str,
    codec: str,
    *,
    wanted: set[str] | None = None,
    since: float | None = None,
    first_page: Sequence[tuple[str, Mapping[str, Any]]] | None = None,
    limit: int = SCAN_LIMIT,
) -> LatestBeats:
    """Read the heartbeat stream newest first, a page at a time, and keep the newest beats.

    Stops once every agent in ``wanted`` is found, at entries older than ``since`` (epoch
    seconds, by entry ID), after ``limit`` entries, or at the stream's start.
    ``first_page`` is a newest-first page already read (a pipeline's XREVRANGE).
    """
    found = LatestBeats()
    low = "-" if since is None else f"{max(0, int(since * 1000))}-0"
    page = (
        list(first_page)
        if first_page is not None
        else await client.xrevrange(key, "+", low, count=min(PAGE, limit))
    )
    while page:
        if found.newest_id is None:
            found.newest_id = page[0][0]
        for entry_id, raw in page:
            beat = parse_beat(codec, entry_id, raw)
            if beat is not None:
                found.add(beat)
        found.scanned += len(page)
        if wanted is not None and wanted <= found.agents.keys():
            break
        if len(page) < PAGE or found.scanned >= limit:
            break
        count = min(PAGE, limit - found.scanned)
        page = await client.xrevrange(key, f"({page[-1][0]}", low, count=count)
    return found


def slot_mate(key: str, suffix: str) -> str:
    """A key in the same cluster slot as ``key``: ``key`` + ``suffix``, ``key`` tagged."""
    start = key.find("{")
    tagged = start >= 0 and key.find("}", start + 2) > start
    return f"{key}{suffix}" if tagged else f"{{{key}}}{suffix}"


# KEYS[1] the agents' state hash, KEYS[2] the event stream (then the lease); ARGV[1] the
# lease value, ARGV[2] the agent, ARGV[3] "up" or "down", ARGV[4...] the event's fields.
# Records the state and publishes the event only when the recorded state differs, so a
# transition gives one event whichever runner holds the duty and however often it is
# seen. The first state recorded for an agent publishes only when it is "down".
# Returns 0 (already recorded), 1 (recorded) or 2 (recorded and published).
TRANSITION = (
    FENCE_CHECK
    + """
local was = redis.call('HGET', KEYS[1], ARGV[2])
if was == ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if was == false and ARGV[3] == 'up' then return 1 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
return 2
"""
)


async def record_transition(
    client: Any, fence: Fence, event_key: str, agent: str, up: bool, entry: Mapping[str, Any]
) -> int:
    """Record ``agent``'s state and publish ``entry`` to ``event_key`` if it changed."""
    flat: list[Any] = []
    for pair in entry.items():
        flat += pair
    state_key = slot_mate(event_key, ":agents")
    reply = await fenced_call(
        client, TRANSITION, fence, [state_key, event_key], [agent, "up" if up else "down", *flat]
    )
    return int(reply)
