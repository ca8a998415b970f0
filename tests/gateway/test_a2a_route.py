"""The ``a2a`` route action calls an external A2A agent: here the gateway's own A2A
endpoint is the other side (issue 16, item 2, both ways)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import HAROLD, MAUDE, beside_runner
from projects import NewProject
from test_a2a import FLOWS, HANDLERS

from cortex_flow import Client, RequestFailed

CALLER = """
  jobs: {key: "{P}jobs", codec: json}
"""

CALLING = """
  jobs:
    stream: jobs
    dead_letter: dlq
    retry: {max_deliveries: 1}
    routes:
      - a2a:
          url: "http://127.0.0.1:PORT/a2a/helper"
          headers: {Authorization: "Bearer ${HAROLD_TOKEN}"}
          timeout: 10s
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def config(
    new_project: NewProject, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Path]:
    monkeypatch.setenv("HAROLD_TOKEN", HAROLD)
    monkeypatch.setenv("MAUDE_TOKEN", MAUDE)
    port = _free_port()
    flows = FLOWS.replace("streams:\n", "streams:" + CALLER, 1) + CALLING.replace("PORT", str(port))
    path, _ = new_project(flows, HANDLERS)
    async with beside_runner(path, redis_url, port=port):
        yield path


async def test_a_route_calls_an_a2a_agent_and_replies_with_its_answer(config: Path) -> None:
    async with Client.from_config(config) as client:
        assert await client.request("jobs", {"n": 4}, timeout=20) == {"n": 8, "text": None}
        story = await client.request("jobs", {"op": "story"}, timeout=20)
        assert story == ["once", "upon", "a", "time"]


async def test_a_failed_a2a_task_fails_the_message(config: Path) -> None:
    async with Client.from_config(config) as client:
        with pytest.raises(RequestFailed) as failed:
            await client.request("jobs", {"op": "fail"}, timeout=20)
    assert "ended failed" in failed.value.reason and "no good" in failed.value.reason
