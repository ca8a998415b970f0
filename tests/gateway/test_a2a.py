"""The A2A protocol's server side at the gateway, spoken as raw JSON-RPC 2.0 (issue 16,
item 2): the agent card, message/send, message/stream, tasks/get, tasks/cancel, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from conftest import HAROLD, MAUDE, beside_runner
from projects import NewProject, pending, wait_for

FLOWS = """
version: 1
streams:
  ask: {key: "{P}ask", codec: json}
  dlq: {key: "{P}dlq"}
agents:
  harold: {token: "${HAROLD_TOKEN}", may_send: [ask]}
  maude: {token: "${MAUDE_TOKEN}"}
  helper:
    a2a:
      description: Doubles numbers and tells stories.
      stream: ask
      skills:
        - {id: double, name: Double, description: Doubles n., tags: [math]}
        - {id: story, name: Story, description: Tells a story word by word.}
groups:
  ask:
    stream: ask
    dead_letter: dlq
    retry: {max_deliveries: 1}
    routes:
      - when: "msg.op == 'fail'"
        call: {M}:fail
      - when: "msg.op == 'story'"
        call: {M}:story
      - when: "msg.op == 'slow'"
        call: {function: "{M}:slow", timeout: 30s}
      - call: {M}:double
"""

HANDLERS = """
import asyncio

async def double(msg):
    return {"n": int(msg["n"]) * 2, "text": msg.get("text")}

async def fail(msg):
    raise ValueError("no good")

async def story(msg):
    for word in ["once", "upon", "a", "time"]:
        yield word

async def slow(msg):
    await asyncio.sleep(20)
    return "late"
"""


@dataclass
class A2A:
    http: TestClient  # type: ignore[type-arg]
    redis: aioredis.Redis
    prefix: str

    async def rpc(self, method: str, params: Any, token: str = HAROLD) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
        resp = await self.http.post("/a2a/helper", json=body, headers=auth(token))
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        assert answer["jsonrpc"] == "2.0" and answer["id"] == 7
        return answer


def auth(token: str = HAROLD) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def message(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "message": {
            "kind": "message",
            "messageId": "m1",
            "role": "user",
            "parts": list(parts),
            **extra,
        }
    }


@pytest.fixture
async def a2a(
    new_project: NewProject,
    redis_url: str,
    key_prefix: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[A2A]:
    monkeypatch.setenv("HAROLD_TOKEN", HAROLD)
    monkeypatch.setenv("MAUDE_TOKEN", MAUDE)
    path, _ = new_project(FLOWS, HANDLERS)
    async with beside_runner(path, redis_url) as client:
        yield A2A(client, redis_client, key_prefix)


async def test_the_agent_card(a2a: A2A) -> None:
    resp = await a2a.http.get("/a2a/helper/.well-known/agent-card.json")  # no token needed
    assert resp.status == 200
    card = await resp.json()
    assert card["name"] == "helper"
    assert card["description"] == "Doubles numbers and tells stories."
    assert card["url"] == f"http://{a2a.http.host}:{a2a.http.port}/a2a/helper"
    assert card["capabilities"]["streaming"] is True
    assert card["protocolVersion"] == "0.3.0" and card["version"] == "1.0.0"
    assert [s["id"] for s in card["skills"]] == ["double", "story"]
    assert card["skills"][0]["tags"] == ["math"]
    assert "text/plain" in card["defaultInputModes"] and card["defaultOutputModes"]
    missing = await a2a.http.get("/a2a/harold/.well-known/agent-card.json")
    assert missing.status == 404
    assert "helper" in (await missing.json())["fix"]


async def test_message_send_completes_with_the_reply(a2a: A2A) -> None:
    answer = await a2a.rpc(
        "message/send", message({"kind": "text", "text": "hi"}, {"kind": "data", "data": {"n": 21}})
    )
    task = answer["result"]
    assert task["kind"] == "task" and task["status"]["state"] == "completed"
    assert task["artifacts"][0]["parts"] == [{"kind": "data", "data": {"n": 42, "text": "hi"}}]
    assert task["history"][0]["messageId"] == "m1"
    # the task ID is the entry ID of the request on the agent's stream
    entries = await a2a.redis.xrange(f"{a2a.prefix}ask")
    assert [e[0] for e in entries] == [task["id"]]
    got = await a2a.rpc("tasks/get", {"id": task["id"]})
    assert got["result"]["status"]["state"] == "completed"
    assert got["result"]["artifacts"] == task["artifacts"]


async def test_a_failed_task(a2a: A2A) -> None:
    answer = await a2a.rpc("message/send", message({"kind": "data", "data": {"op": "fail"}}))
    task = answer["result"]
    assert task["status"]["state"] == "failed"
    assert "no good" in task["status"]["message"]["parts"][0]["text"]
    assert await a2a.redis.xlen(f"{a2a.prefix}dlq") == 1


async def test_message_stream_sends_parts_then_the_end(a2a: A2A) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": "s",
        "method": "message/stream",
        "params": message({"kind": "data", "data": {"op": "story"}}),
    }
    resp = await a2a.http.post("/a2a/helper", json=body, headers=auth())
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    events = [
        json.loads(line[len("data: ") :])["result"]
        for line in (await resp.text()).splitlines()
        if line.startswith("data: ")
    ]
    assert events[0]["kind"] == "task" and events[0]["status"]["state"] == "submitted"
    words = [e["artifact"]["parts"][0]["text"] for e in events if e["kind"] == "artifact-update"]
    assert words == ["once", "upon", "a", "time"]
    states = [e["status"]["state"] for e in events if e["kind"] == "status-update"]
    assert states == ["working", "completed"]
    assert events[-1]["final"] is True and events[-1]["taskId"] == events[0]["id"]


async def test_tasks_cancel_and_get(a2a: A2A) -> None:
    sent = await a2a.rpc(
        "message/send",
        {**message({"kind": "data", "data": {"op": "slow"}}), "configuration": {"blocking": False}},
    )
    task_id = sent["result"]["id"]
    assert sent["result"]["status"]["state"] in ("submitted", "working")
    await wait_for(
        lambda: pending(a2a.redis, f"{a2a.prefix}ask", "ask"), what="the task being handled"
    )
    assert (await a2a.rpc("tasks/get", {"id": task_id}))["result"]["status"]["state"] == "working"
    canceled = await a2a.rpc("tasks/cancel", {"id": task_id})
    assert canceled["result"]["status"]["state"] == "canceled"
    got = await a2a.rpc("tasks/get", {"id": task_id})
    assert got["result"]["status"]["state"] == "canceled"
    again = await a2a.rpc("tasks/cancel", {"id": task_id})
    assert again["error"]["code"] == -32002


async def test_json_rpc_errors(a2a: A2A) -> None:
    http = a2a.http
    parse = await (await http.post("/a2a/helper", data="{nope", headers=auth())).json()
    assert parse["error"]["code"] == -32700 and parse["id"] is None
    batch = await (await http.post("/a2a/helper", json=[], headers=auth())).json()
    assert batch["error"]["code"] == -32600
    no_version = await (
        await http.post("/a2a/helper", json={"id": 1, "method": "tasks/get"}, headers=auth())
    ).json()
    assert no_version["error"]["code"] == -32600
    assert (await a2a.rpc("tasks/list", {}))["error"]["code"] == -32601
    assert (await a2a.rpc("message/send", {"message": "hi"}))["error"]["code"] == -32602
    assert (await a2a.rpc("message/send", message()))["error"]["code"] == -32602
    file = message({"kind": "file", "file": {"uri": "file:///x"}})
    assert (await a2a.rpc("message/send", file))["error"]["code"] == -32005
    assert (await a2a.rpc("tasks/get", {}))["error"]["code"] == -32602
    assert (await a2a.rpc("tasks/get", {"id": "nope"}))["error"]["code"] == -32001
    assert (await a2a.rpc("tasks/get", {"id": "1-0"}))["error"]["code"] == -32001
    assert (await a2a.rpc("tasks/cancel", {"id": "1-0"}))["error"]["code"] == -32001
    assert await a2a.redis.xlen(f"{a2a.prefix}ask") == 0


async def test_auth_refusals(a2a: A2A) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": message()}
    none = await a2a.http.post("/a2a/helper", json=body)
    maude = await a2a.http.post("/a2a/helper", json=body, headers=auth(MAUDE))
    other = await a2a.http.post("/a2a/harold", json=body, headers=auth())
    assert [none.status, maude.status, other.status] == [401, 403, 404]
    assert "may_send" in (await maude.json())["fix"]


async def test_concurrent_sends_each_get_their_own_reply(a2a: A2A) -> None:
    answers = await asyncio.gather(
        *(a2a.rpc("message/send", message({"kind": "data", "data": {"n": n}})) for n in range(5))
    )
    assert [a["result"]["artifacts"][0]["parts"][0]["data"]["n"] for a in answers] == [
        0, 2, 4, 6, 8
    ]  # fmt: skip
    assert len({a["result"]["id"] for a in answers}) == 5
