"""Entries that are not UTF-8 or cannot be decoded, against a real Redis: each goes to the
dead-letter stream alone, its bytes kept, and every good entry beside it is delivered."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from projects import NewProject, module, none_pending, running, wait_for

from cortex_flow.client import Client
from cortex_flow.flow.loader import load_project
from cortex_flow.wire.connection import redis_from_url

BAD_FIELDS = {b"n": b"bad", b"text": b"\xff\xfeoops", b"na\xc3me\xff": b"x"}

FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
      done: {key: "{P}done"}
      dlq: {key: "{P}dlq"}
    groups:
      work:
        stream: jobs
        dead_letter: dlq
        batch: 10
        concurrency: 4
        retry: {max_deliveries: 3, backoff: {initial: 50ms, max: 50ms}}
        routes:
          - ROUTE
"""

HANDLERS = """
handled = []

def handle(msg):
    handled.append(msg["n"])

async def handle_async(msg):
    handled.append(msg["n"])
"""

ROUTES = {
    "to": "to: done",
    "sync call": 'call: "{M}:handle"',
    "inline sync call": 'call: {function: "{M}:handle", inline: true}',
    "async call": 'call: "{M}:handle_async"',
}


@pytest.fixture
def raw_redis(redis_url: str) -> Any:
    """A client that reads and writes bytes, as they lie in Redis."""
    with redis.Redis.from_url(redis_url) as client:
        yield client


def _add_mixed(raw: Any, key: str, good: int, bad_at: int) -> bytes:
    """``good`` entries n=0.. with one entry that is not UTF-8 among them; its ID."""
    bad_id = b""
    for n in range(good):
        if n == bad_at:
            bad_id = raw.xadd(key, BAD_FIELDS)
        raw.xadd(key, {"n": str(n)})
    return bad_id


async def _delivered(kind: str, key_prefix: str, mod: str, raw: Any) -> list[str]:
    if kind == "to":
        return [f[b"n"].decode() for _, f in raw.xrange(f"{key_prefix}done")]
    return list(module(mod).handled)


@pytest.mark.parametrize("kind", list(ROUTES))
async def test_an_entry_that_is_not_utf8_is_dead_lettered_byte_for_byte_and_the_group_goes_on(
    new_project: NewProject, redis_client: Any, raw_redis: Any, key_prefix: str, kind: str
) -> None:
    """One entry with bytes that are not UTF-8 among 30 good ones: the 30 are delivered once
    each, the bad one alone is dead-lettered with its fields byte for byte and the field
    named in dlq_error (on the previous main the read failed for good: none delivered)."""
    config, mod = new_project(FLOW.replace("ROUTE", ROUTES[kind]), HANDLERS)
    jobs = f"{key_prefix}jobs"
    bad_id = _add_mixed(raw_redis, jobs, 30, bad_at=12)
    async with running(config):
        await wait_for(lambda: raw_redis.xlen(f"{key_prefix}dlq") == 1, what="the dead letter")
        await wait_for(
            lambda: none_pending(redis_client, jobs, "work"), what="every entry acknowledged"
        )
        delivered = await _delivered(kind, key_prefix, mod, raw_redis)
    assert sorted(delivered, key=int) == [str(n) for n in range(30)]
    [(_, dead)] = raw_redis.xrange(f"{key_prefix}dlq")
    assert {k: v for k, v in dead.items() if not k.startswith(b"dlq_")} == BAD_FIELDS
    assert dead[b"dlq_id"] == bad_id
    assert dead[b"dlq_deliveries"] == b"1"
    assert dead[b"dlq_error"] == (
        b"cannot decode: field `text`: its value is not UTF-8 (byte 0xff at offset 0)"
    )


async def test_an_entry_nested_too_deep_in_an_inline_batch_dead_letters_only_itself(
    new_project: NewProject, redis_client: Any, raw_redis: Any, key_prefix: str
) -> None:
    """A JSON message nested 100,000 deep in a batch of 50: the 49 good ones are published
    once each, the bad one is dead-lettered after one delivery with the real reason."""
    flow = FLOW.replace('"{P}jobs"}', '"{P}jobs", codec: json}').replace("batch: 10", "batch: 50")
    config, _ = new_project(flow.replace("ROUTE", "to: done"))
    jobs = f"{key_prefix}jobs"
    for n in range(50):
        data = "[" * 100_000 + "]" * 100_000 if n == 20 else json.dumps({"n": n})
        raw_redis.xadd(jobs, {"data": data})
    async with running(config):
        await wait_for(lambda: raw_redis.xlen(f"{key_prefix}dlq") == 1, what="the dead letter")
        await wait_for(lambda: none_pending(redis_client, jobs, "work"), what="all acknowledged")
    done = [int(f[b"n"]) for _, f in raw_redis.xrange(f"{key_prefix}done")]
    assert done == [n for n in range(50) if n != 20]
    [(_, dead)] = raw_redis.xrange(f"{key_prefix}dlq")
    assert dead[b"dlq_deliveries"] == b"1"
    assert dead[b"dlq_error"] == b"cannot decode: json codec: `data` is nested too deep"


async def test_a_claimed_entry_that_is_not_utf8_is_dead_lettered(
    new_project: NewProject, redis_client: Any, raw_redis: Any, key_prefix: str
) -> None:
    """Entries a crashed consumer held (XAUTOCLAIM and XCLAIM replies) decode per entry too:
    the bad one is dead-lettered with its bytes, the 10 good ones delivered."""
    flow = FLOW.replace("ROUTE", "to: done").replace(
        "max_deliveries: 3", "max_deliveries: 3, claim_idle: 200ms"
    )
    config, _ = new_project(flow)
    jobs = f"{key_prefix}jobs"
    raw_redis.xgroup_create(jobs, "work", id="0", mkstream=True)
    _add_mixed(raw_redis, jobs, 10, bad_at=4)
    assert len(raw_redis.xreadgroup("work", "crashed", {jobs: ">"})[0][1]) == 11
    async with running(config):
        await wait_for(lambda: raw_redis.xlen(f"{key_prefix}dlq") == 1, what="the dead letter")
        await wait_for(lambda: none_pending(redis_client, jobs, "work"), what="all acknowledged")
    done = [f[b"n"] for _, f in raw_redis.xrange(f"{key_prefix}done")]
    assert sorted(done, key=int) == [str(n).encode() for n in range(10)]
    [(_, dead)] = raw_redis.xrange(f"{key_prefix}dlq")
    assert {k: v for k, v in dead.items() if not k.startswith(b"dlq_")} == BAD_FIELDS
    assert b"not UTF-8" in dead[b"dlq_error"]


INBOX_FLOW = """
    version: 1
    streams:
      inbox: {key: "{P}inbox:{{ agent }}"}
      dlq: {key: "{P}dlq"}
    agents:
      harold: {}
    groups:
      harold:
        stream: inbox
        vars: {agent: harold}
        dead_letter: dlq
        routes: [{drop: true}]
"""


async def test_the_client_inbox_dead_letters_an_entry_that_is_not_utf8(
    new_project: NewProject, raw_redis: Any, redis_url: str, key_prefix: str
) -> None:
    """Client.inbox yields the good messages and dead-letters the one that is not UTF-8
    (its bytes kept) instead of failing the read (on the previous main: UnicodeDecodeError)."""
    config, _ = new_project(INBOX_FLOW)
    inbox = f"{key_prefix}inbox:harold"
    _add_mixed(raw_redis, inbox, 5, bad_at=2)
    client = Client(load_project(config), redis_from_url(redis_url), "harold", owns=True)
    seen = []
    async with client:
        async for message in client.inbox(block=0.05):
            seen.append(message.msg["n"])
            await message.ack()
            if len(seen) == 5:
                break
    assert seen == ["0", "1", "2", "3", "4"]
    [(_, dead)] = raw_redis.xrange(f"{key_prefix}dlq")
    assert {k: v for k, v in dead.items() if not k.startswith(b"dlq_")} == BAD_FIELDS
    assert raw_redis.xpending(inbox, "harold")["pending"] == 0


class _HostileJson:
    """``json`` as the codec sees it, failing on one message the way hostile input can."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def loads(self, text: str) -> Any:
        if text == '"poison"':
            raise self.error
        return json.loads(text)

    def dumps(self, value: Any, **options: Any) -> str:
        return json.dumps(value, **options)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (MemoryError(), "cannot decode: json codec: `data` (8 characters) is too big"),
        (LookupError("odd"), "cannot decode: LookupError: odd"),
    ],
)
async def test_any_failure_preparing_one_entry_dead_letters_it_alone(
    new_project: NewProject,
    redis_client: Any,
    raw_redis: Any,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    reason: str,
) -> None:
    """MemoryError or any other exception decoding one entry of an inline batch of 20:
    the 19 others are published once, that one is dead-lettered after one delivery with
    the real reason (on the previous main the batch failed as a whole)."""
    monkeypatch.setattr("cortex_flow.wire.codec.json", _HostileJson(error))
    flow = FLOW.replace('"{P}jobs"}', '"{P}jobs", codec: json}').replace("batch: 10", "batch: 20")
    config, _ = new_project(flow.replace("ROUTE", "to: done"))
    jobs = f"{key_prefix}jobs"
    for n in range(20):
        raw_redis.xadd(jobs, {"data": '"poison"' if n == 7 else json.dumps({"n": n})})
    async with running(config):
        await wait_for(lambda: raw_redis.xlen(f"{key_prefix}dlq") == 1, what="the dead letter")
        await wait_for(lambda: none_pending(redis_client, jobs, "work"), what="all acknowledged")
    done = [int(f[b"n"]) for _, f in raw_redis.xrange(f"{key_prefix}done")]
    assert done == [n for n in range(20) if n != 7]
    [(_, dead)] = raw_redis.xrange(f"{key_prefix}dlq")
    assert (dead[b"dlq_deliveries"], dead[b"dlq_error"].decode()) == (b"1", reason)


async def test_without_a_dead_letter_the_inbox_skips_such_an_entry_and_leaves_it_pending(
    new_project: NewProject,
    raw_redis: Any,
    redis_url: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no dead_letter to send it to, Client.inbox logs the entry that is not UTF-8,
    leaves it pending (nothing is lost) and yields the good ones."""
    config, _ = new_project(INBOX_FLOW.replace("dead_letter: dlq", ""))
    inbox = f"{key_prefix}inbox:harold"
    _add_mixed(raw_redis, inbox, 3, bad_at=1)
    client = Client(load_project(config), redis_from_url(redis_url), "harold", owns=True)
    seen = []
    async with client:
        async for message in client.inbox(block=0.05):
            seen.append(message.msg["n"])
            await message.ack()
            if len(seen) == 3:
                break
    assert seen == ["0", "1", "2"]
    assert raw_redis.xpending(inbox, "harold")["pending"] == 1
    assert "has no dead_letter, so it stays pending" in caplog.text
