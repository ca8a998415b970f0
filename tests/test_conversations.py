"""Deadlines, task states, cancels and streamed replies, on the real runner and server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from projects import NewProject, equals, module, none_pending, running, wait_for

from cortex_flow import Client, RequestCanceled, RequestFailed
from cortex_flow.ops.requests import project_prefix
from cortex_flow.wire.replies import cancel_channel

FLOWS = """
version: 1
streams:
  work: {key: "{P}work"}
  slow: {key: "{P}slow"}
  chat: {key: "{P}chat"}
  bare: {key: "{P}bare"}
  tracked: {key: "{P}tracked"}
  dlq: {key: "{P}dlq"}
groups:
  work:
    stream: work
    dead_letter: dlq
    retry: {max_deliveries: 5, backoff: {initial: 2s}}
    routes:
      - when: "msg.op == 'flaky'"
        call: {M}:flaky
      - call: {M}:echo
  slow:
    stream: slow
    dead_letter: dlq
    routes:
      - when: "msg.op == 'sync'"
        call: {M}:slow_sync
      - call: {M}:slow_async
  chat:
    stream: chat
    routes:
      - call: {M}:tokens
  bare:
    stream: bare
    ttl: 50ms
    routes:
      - call: {M}:echo
  tracked:
    stream: tracked
    track: true
    keep_tasks: 5s
    routes:
      - call: {M}:echo
"""

HANDLERS = """
import asyncio, threading, time

handled = []
started = asyncio.Event()
release = threading.Event()
cancelled = []

async def echo(msg):
    handled.append(msg.get("n"))
    return msg

async def flaky(msg):
    raise RuntimeError("flaky")

async def slow_async(msg):
    started.set()
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        cancelled.append(msg.get("n"))
        raise
    return "late"

def slow_sync(msg):
    handled.append("sync-start")
    release.wait(10)
    handled.append("sync-end")
    return "discarded"

async def tokens(msg):
    for word in msg["text"].split():
        yield word
"""


@pytest.fixture
def project(new_project: NewProject) -> tuple[Path, str]:
    return new_project(FLOWS, HANDLERS)


async def test_a_request_read_after_its_deadline_is_not_handled(
    project: tuple[Path, str], redis_client: Any, key_prefix: str
) -> None:
    """Published with a ttl and read after it: dead-lettered as expired, never handled,
    and the requester hears RequestFailed saying it expired; its task says expired."""
    path, mod = project
    async with Client.from_config(path) as client:
        await client.publish("work", {"n": "old"}, ttl=0.05)
        asking = asyncio.create_task(client.request("work", {"n": "asked"}, ttl="50ms", timeout=20))
        await asyncio.sleep(0.2)  # both deadlines pass before any runner reads them
        async with running(path):
            with pytest.raises(RequestFailed, match="expired") as failed:
                await asking
            assert failed.value.expired
            await wait_for(lambda: none_pending(redis_client, f"{key_prefix}work", "work"))
        dead = await redis_client.xrange(f"{key_prefix}dlq")
        assert [f["n"] for _, f in dead] == ["old", "asked"]
        assert all(f["dlq_error"].startswith("expired: its deadline passed") for _, f in dead)
        assert module(mod).handled == []
        task = await client.task(dead[1][1]["dlq_id"], stream="work")
        assert (task.state, task.error) == ("expired", dead[1][1]["dlq_error"])


async def test_a_group_ttl_without_dead_letter_acks_and_counts(
    project: tuple[Path, str], redis_client: Any, key_prefix: str
) -> None:
    """A group's ttl applies to messages without one; with no dead_letter they are
    acknowledged and counted as expired."""
    path, mod = project
    await redis_client.xadd(f"{key_prefix}bare", {"n": "1"})
    await asyncio.sleep(0.1)
    async with running(path) as runner:
        await wait_for(lambda: none_pending(redis_client, f"{key_prefix}bare", "bare"))
        stats = runner.stats.groups["bare"].key(f"{key_prefix}bare")
        await wait_for(lambda: stats.expired == 1, what="counted as expired")
        async with Client.from_config(path) as client:  # a fresh one is handled
            assert await client.request("bare", {"n": "2"}, timeout=10) == {"n": "2"}
    assert module(mod).handled == ["2"]


async def test_retries_never_run_past_a_deadline(
    project: tuple[Path, str], redis_client: Any, key_prefix: str
) -> None:
    """A failure whose next retry (2s backoff) falls after the deadline expires at once."""
    path, _ = project
    async with running(path), Client.from_config(path) as client:
        with pytest.raises(RequestFailed, match="expired: its deadline falls before its next"):
            await client.request("work", {"op": "flaky"}, ttl=1, timeout=10)


async def test_task_states_of_a_tracked_group_and_of_requests(
    project: tuple[Path, str], redis_client: Any, key_prefix: str
) -> None:
    """submitted before a runner reads it, completed after, with attempts and the reply
    stream; a tracked group keeps states of plain messages too, for keep_tasks."""
    path, _ = project
    async with Client.from_config(path) as client:
        plain = await redis_client.xadd(f"{key_prefix}tracked", {"n": "7"})
        submitted = await client.task(plain, stream="tracked")
        assert submitted.state == "submitted"
        async with running(path):
            assert await client.request("work", {"n": "1"}, timeout=10) == {"n": "1"}
            (asked,) = list(client._asked)

            async def completed() -> bool:
                return (await client.task(plain, stream="tracked")).state == "completed"

            await wait_for(completed, what="the tracked message completed")
            done = await client.task(plain, stream="tracked")
        assert (done.state, done.attempts, done.reply) == ("completed", 1, None)
        task = await client.task(asked)
        assert task.state == "completed" and task.attempts == 1
        assert task.reply is not None and task.reply.startswith(f"{key_prefix}replies:")
        ttl = await redis_client.pttl(f"{key_prefix}task:{key_prefix}tracked:{plain}")
        assert 0 < ttl <= 5000


async def test_cancel_a_running_async_handler(project: tuple[Path, str]) -> None:
    """Its task is cancelled, the requester gets RequestCanceled, the state says canceled;
    canceling it again says so and changes nothing."""
    path, mod = project
    async with running(path), Client.from_config(path) as client:
        asking = asyncio.create_task(client.request("slow", {"n": "1"}, timeout=20))
        await wait_for(lambda: module(mod).started.is_set(), what="the handler started")
        (entry_id,) = list(client._asked)
        assert await client.cancel(entry_id) is True
        with pytest.raises(RequestCanceled):
            await asking
        await wait_for(lambda: module(mod).cancelled == ["1"], what="the handler cancelled")
        assert (await client.task(entry_id)).state == "canceled"
        assert await client.cancel(entry_id) is False


async def test_cancel_a_sync_handler_discards_its_result(
    project: tuple[Path, str], redis_client: Any, key_prefix: str
) -> None:
    """A sync handler runs to its end; its result is discarded and the state stays canceled."""
    path, mod = project
    async with running(path) as runner, Client.from_config(path) as client:
        asking = asyncio.create_task(client.request("slow", {"op": "sync"}, timeout=20))
        await wait_for(lambda: "sync-start" in module(mod).handled, what="the handler started")
        (entry_id,) = list(client._asked)
        assert await client.cancel(entry_id) is True
        module(mod).release.set()
        with pytest.raises(RequestCanceled):
            await asking
        await wait_for(lambda: none_pending(redis_client, f"{key_prefix}slow", "slow"))
        stats = runner.stats.groups["slow"].key(f"{key_prefix}slow")
        await wait_for(lambda: stats.canceled == 1, what="counted as canceled")
        assert (await client.task(entry_id)).state == "canceled"


async def test_cancel_before_handling_and_after_completion(
    project: tuple[Path, str], redis_client: Any, key_prefix: str
) -> None:
    """Canceled before any runner read it: acknowledged without running its routes.
    Canceling a completed one says so and changes nothing."""
    path, mod = project
    async with Client.from_config(path) as client:
        asking = asyncio.create_task(client.request("work", {"n": "never"}, timeout=20))
        await wait_for(lambda: client._asked, what="published")
        (entry_id,) = list(client._asked)
        assert await client.cancel(entry_id) is True
        with pytest.raises(RequestCanceled):
            await asking
        async with running(path) as runner:
            await wait_for(lambda: none_pending(redis_client, f"{key_prefix}work", "work"))
            stats = runner.stats.groups["work"].key(f"{key_prefix}work")
            await wait_for(lambda: stats.canceled == 1, what="counted as canceled")
            assert await client.request("work", {"n": "done"}, timeout=10) == {"n": "done"}
        assert module(mod).handled == ["done"]
        done = next(i for i in client._asked if i != entry_id)
        assert await client.cancel(done) is False
        assert (await client.task(done)).state == "completed"


async def test_a_streaming_handler_sends_parts_then_the_end(project: tuple[Path, str]) -> None:
    """Each item an async generator yields is a part, in order; raw parts carry seq and
    attempt."""
    path, _ = project
    async with running(path), Client.from_config(path) as client:
        words = [w async for w in client.stream("chat", {"text": "a b c d"}, timeout=10)]
        assert words == ["a", "b", "c", "d"]
        parts = [p async for p in client.stream("chat", {"text": "x y"}, timeout=10, raw=True)]
        assert [(p.kind, p.data, p.seq, p.attempt) for p in parts] == [
            ("part", "x", 0, 1),
            ("part", "y", 1, 1),
            ("final", None, 2, 1),
        ]


async def test_a_failed_attempt_shows_in_the_task_state(project: tuple[Path, str]) -> None:
    """While a request waits for its retry, its task is working with the last error."""
    path, _ = project
    async with running(path), Client.from_config(path) as client:
        asking = asyncio.create_task(client.request("work", {"op": "flaky"}, timeout=20))
        await wait_for(lambda: client._asked, what="published")
        (entry_id,) = list(client._asked)

        async def noted() -> bool:
            return (await client.task(entry_id)).error is not None

        await wait_for(noted, what="the failed attempt noted")
        task = await client.task(entry_id)
        assert (task.state, task.attempts) == ("working", 1)
        assert task.error == "routes[0]: RuntimeError: flaky"
        assert await client.cancel(entry_id) is True
        with pytest.raises(RequestCanceled):
            await asking


async def test_a_runner_listens_for_cancels_once_for_all_its_groups(
    project: tuple[Path, str], redis_client: Any
) -> None:
    """One subscription to the cancel channel per runner, whatever its number of groups
    (idle groups stay nearly free); it ends with the runner."""
    path, _ = project

    async def listeners(channel: str) -> int:
        ((_, count),) = await redis_client.pubsub_numsub(channel)
        return int(count)

    async with Client.from_config(path) as client:
        channel = cancel_channel(project_prefix(client.project))
        async with running(path) as runner:
            assert len(runner.project.topology.groups) == 5
            await wait_for(lambda: equals(listeners(channel), 1), what="the subscription")
            await asyncio.sleep(0.2)  # every group started meanwhile: still one
            assert await listeners(channel) == 1
        await wait_for(lambda: equals(listeners(channel), 0), what="unsubscribed")
