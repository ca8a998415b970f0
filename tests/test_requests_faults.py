"""Request/reply under crashes, several runners, many requesters, expiring reply streams."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from projects import NewProject, end, lines, make_project, running, spawn_runner, wait_for

from cortex_flow import Client

FLOWS = """
version: 1
streams:
  ask: {key: "{P}ask"}
groups:
  ask:
    stream: ask
    concurrency: 16
    retry: {claim_idle: 1s, backoff: {initial: 100ms}}
    routes:
      - call: {M}:answer
"""

# The first handling of each message records itself and kills its runner before the
# commit (between handling and replying); a later one answers.
CRASHING = """
import os, signal
from pathlib import Path

LOG = Path(__file__).parent / "handled.txt"

async def answer(msg):
    first = not LOG.exists()
    with LOG.open("a") as out:
        out.write(msg["n"] + "\\n")
    if first:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"n": msg["n"], "pid": os.getpid()}
"""

ANSWERING = """
import os
answered = []

async def answer(msg):
    answered.append(msg["who"])
    return {"who": msg["who"], "i": msg["i"]}
"""


async def test_a_runner_killed_between_handling_and_replying(
    tmp_path: Path, new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """The runner dies after the handler ran, before its commit: the message is handled
    again by the restarted runner and exactly one reply arrives, from that handling."""
    config, _ = new_project(FLOWS, CRASHING)
    log = tmp_path / "runner.log"
    first = spawn_runner(config, log)
    second = None
    try:
        async with Client.from_config(config) as client:
            asking = asyncio.create_task(client.request("ask", {"n": "7"}, timeout=60))
            await wait_for(lambda: first.poll() is not None, timeout=30, what="the kill")
            second = spawn_runner(config, log)
            reply = await asking
            assert reply["n"] == "7" and reply["pid"] == second.pid
            assert lines(tmp_path / "handled.txt") == ["7", "7"]
            rows = await redis_client.xrange(client.reply_stream)
            finals = [f for _, f in rows if f.get("kind") == "final"]
            assert len(finals) == 1 and finals[0]["attempt"] == "2"
    finally:
        end(first)
        if second is not None:
            end(second)


async def test_two_runners_and_fifty_requesters(
    tmp_path: Path, new_project: NewProject, redis_url: str, key_prefix: str, redis_client: Any
) -> None:
    """50 clients ask 4 questions each, at once, of a group two runners share: every
    requester gets exactly its own answers, each once; every reply stream expires."""
    config, mod = new_project(FLOWS, ANSWERING)
    other = make_project(
        tmp_path / "b", FLOWS, url=redis_url, name="t2", prefix=key_prefix, mod=mod
    )
    async with running(config), running(other):
        clients = [Client.from_config(config, reply_idle=60) for _ in range(50)]

        async def ask(n: int, client: Client) -> list[Any]:
            async with client:
                return await asyncio.gather(
                    *(
                        client.request("ask", {"who": str(n), "i": str(i)}, timeout=30)
                        for i in range(4)
                    )
                )

        results = await asyncio.gather(*(ask(n, c) for n, c in enumerate(clients)))
    for n, answers in enumerate(results):
        assert answers == [{"who": str(n), "i": str(i)} for i in range(4)]
    keys = {c.reply_stream for c in clients}
    assert len(keys) == 50
    for key in keys:
        ttl = await redis_client.pttl(key)
        assert 0 < ttl <= 60_000
        rows = await redis_client.xrange(key)
        assert sum(1 for _, f in rows if f.get("kind") == "final") == 4


async def test_an_unused_reply_stream_expires_and_is_not_made_again(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """A requester gone: its reply stream expires after reply_idle, and a late reply
    (XADD NOMKSTREAM) does not bring it back."""
    config, _ = new_project(FLOWS, ANSWERING)
    async with Client.from_config(config, reply_idle=0.3) as client:
        with pytest.raises(TimeoutError):
            await client.request("ask", {"who": "x", "i": "0"}, timeout=0.2)
        key = client.reply_stream
        assert key is not None
    await wait_for(lambda: equals_missing(redis_client, key), what="the reply stream to expire")
    async with running(config):  # now the old request is answered: to nobody
        await wait_for(
            lambda: none_pending_ask(redis_client, key_prefix), what="the request handled"
        )
    assert not await redis_client.exists(key)


async def equals_missing(redis_client: Any, key: str) -> bool:
    return not await redis_client.exists(key)


async def none_pending_ask(redis_client: Any, key_prefix: str) -> bool:
    groups = await redis_client.xinfo_groups(f"{key_prefix}ask")
    read = bool(groups) and groups[0]["last-delivered-id"] != "0-0"  # Redis 6.2 has no entries-read
    return read and groups[0]["pending"] == 0


STREAM_FLOWS = """
version: 1
streams:
  chat: {key: "{P}chat"}
groups:
  chat:
    stream: chat
    retry: {claim_idle: 1s}
    routes:
      - call: {M}:tokens
"""

# The first handling sends two parts, then its runner dies; the next sends all three.
CRASHING_STREAM = """
import os, signal
from pathlib import Path

LOG = Path(__file__).parent / "streamed.txt"

async def tokens(msg):
    first = not LOG.exists()
    LOG.write_text("started")
    for n, word in enumerate(["a", "b", "c"]):
        yield word
        if first and n == 1:
            os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_parts_of_a_restarted_stream_are_marked(
    tmp_path: Path, new_project: NewProject
) -> None:
    """Parts sent again by a handler restarted after a crash carry a higher attempt;
    client.stream yields each part once, in order."""
    config, _ = new_project(STREAM_FLOWS, CRASHING_STREAM)
    log = tmp_path / "runner.log"
    first = spawn_runner(config, log)
    second = None
    try:
        async with Client.from_config(config) as client:
            words = []

            async def read() -> None:
                async for word in client.stream("chat", {"text": "go"}, timeout=60):
                    words.append(word)

            reading = asyncio.create_task(read())
            await wait_for(lambda: first.poll() is not None, timeout=30, what="the kill")
            second = spawn_runner(config, log)
            await reading
            assert words == ["a", "b", "c"]
            rows = await client.redis.xrange(client.reply_stream)
            parts = [
                (f["data"], f["seq"], f["attempt"]) for _, f in rows if f.get("kind") == "part"
            ]
            assert parts == [
                ('"a"', "0", "1"),
                ('"b"', "1", "1"),
                ('"a"', "0", "2"),
                ('"b"', "1", "2"),
                ('"c"', "2", "2"),
            ]
            finals = [f for _, f in rows if f.get("kind") == "final"]
            assert [(f["seq"], f["attempt"]) for f in finals] == [("3", "2")]
    finally:
        end(first)
        if second is not None:
            end(second)


async def test_a_busy_reply_stream_is_trimmed(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """1,500 replies to one requester leave about 1,000 in its stream (MAXLEN ~)."""
    config, _ = new_project(FLOWS, ANSWERING)
    async with running(config), Client.from_config(config) as client:
        for first in range(0, 1500, 100):
            asks = [{"who": "me", "i": str(i)} for i in range(first, first + 100)]
            await asyncio.gather(*(client.request("ask", a, timeout=30) for a in asks))
        length = await redis_client.xlen(client.reply_stream)
    assert 1000 <= length <= 1100
