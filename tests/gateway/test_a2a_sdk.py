"""Interoperability: the official A2A Python SDK (a2a-sdk, protocol 0.3) as the client of
the gateway's A2A agent: card resolution, message/send, message/stream, tasks/get and
tasks/cancel through the SDK's own JSON-RPC transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import HAROLD, beside_runner
from projects import NewProject
from test_a2a import FLOWS, HANDLERS

pytest.importorskip("a2a.client", reason="a2a-sdk is not installed (pip install -e .[dev])")
httpx = pytest.importorskip("httpx", reason="a2a-sdk's httpx is not installed")

from a2a.client import A2ACardResolver, ClientConfig, ClientFactory  # noqa: E402
from a2a.types import (  # noqa: E402
    DataPart,
    Message,
    Part,
    Role,
    Task,
    TaskIdParams,
    TaskQueryParams,
    TaskState,
    TextPart,
)


@pytest.fixture
async def base_url(
    new_project: NewProject, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    monkeypatch.setenv("HAROLD_TOKEN", HAROLD)
    monkeypatch.setenv("MAUDE_TOKEN", "m" * 24)
    path, _ = new_project(FLOWS, HANDLERS)
    async with beside_runner(path, redis_url) as client:
        yield f"http://127.0.0.1:{client.port}/a2a/helper"


async def _last_task(events: AsyncIterator[Any]) -> Task:
    last = None
    async for event in events:
        assert isinstance(event, tuple), f"expected (task, update), got {event!r}"
        last = event[0]
    assert last is not None
    return last


async def test_the_sdk_client_round_trips(base_url: str) -> None:
    headers = {"Authorization": f"Bearer {HAROLD}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as hx:
        card = await A2ACardResolver(hx, base_url).get_agent_card()
        assert card.name == "helper" and card.capabilities.streaming
        assert [s.id for s in card.skills] == ["double", "story"]

        plain = ClientFactory(ClientConfig(httpx_client=hx, streaming=False)).create(card)
        ask = Message(
            role=Role.user,
            message_id="m1",
            parts=[Part(root=TextPart(text="hi")), Part(root=DataPart(data={"n": 21}))],
        )
        task = await _last_task(plain.send_message(ask))
        assert task.status.state == TaskState.completed
        assert task.artifacts and task.artifacts[0].parts[0].root.data == {"n": 42, "text": "hi"}
        got = await plain.get_task(TaskQueryParams(id=task.id))
        assert got.status.state == TaskState.completed

        streaming = ClientFactory(ClientConfig(httpx_client=hx, streaming=True)).create(card)
        story = Message(
            role=Role.user, message_id="m2", parts=[Part(root=DataPart(data={"op": "story"}))]
        )
        told = await _last_task(streaming.send_message(story))
        assert told.status.state == TaskState.completed
        assert told.artifacts is not None
        assert [p.root.text for p in told.artifacts[0].parts] == ["once", "upon", "a", "time"]

        failed = Message(
            role=Role.user, message_id="m3", parts=[Part(root=DataPart(data={"op": "fail"}))]
        )
        assert (await _last_task(plain.send_message(failed))).status.state == TaskState.failed

        # cancel a slow one, begun without waiting (blocking: false)
        nowait = ClientFactory(ClientConfig(httpx_client=hx, streaming=False, polling=True))
        slow = Message(
            role=Role.user, message_id="m4", parts=[Part(root=DataPart(data={"op": "slow"}))]
        )
        begun = await _last_task(nowait.create(card).send_message(slow))
        assert begun.status.state in (TaskState.submitted, TaskState.working)
        canceled = await plain.cancel_task(TaskIdParams(id=begun.id))
        assert canceled.status.state == TaskState.canceled
