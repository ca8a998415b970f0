"""POST /v1/requests/{stream}: a request through the gateway waits for its reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from conftest import HAROLD, MAUDE, beside_runner
from projects import NewProject, running, wait_for

from cortex_flow import Client
from cortex_flow.flow.loader import load_project
from cortex_flow.gateway import Gateway
from cortex_flow.wire.access import connect

FLOWS = """
version: 1
streams:
  ask: {key: "{P}ask"}
  slow: {key: "{P}slow"}
  dlq: {key: "{P}dlq"}
agents:
  harold: {token: "${HAROLD_TOKEN}", may_send: [ask, slow]}
  maude: {token: "${MAUDE_TOKEN}"}
groups:
  ask:
    stream: ask
    dead_letter: dlq
    retry: {max_deliveries: 1}
    routes:
      - when: "msg.op == 'fail'"
        call: {M}:fail
      - call: {M}:double
  slow:
    stream: slow
    routes:
      - call: {function: "{M}:slow", timeout: 30s}
"""

HANDLERS = """
import asyncio

async def double(msg):
    return {"n": int(msg["n"]) * 2}

async def fail(msg):
    raise ValueError("no good")

async def slow(msg):
    await asyncio.sleep(float(msg.get("sleep", "20")))
    return {"late": True}
"""


@dataclass
class Asking:
    http: TestClient  # type: ignore[type-arg]
    config: Path
    redis: aioredis.Redis
    prefix: str


@pytest.fixture
async def asking(
    new_project: NewProject,
    redis_url: str,
    key_prefix: str,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Asking]:
    monkeypatch.setenv("HAROLD_TOKEN", HAROLD)
    monkeypatch.setenv("MAUDE_TOKEN", MAUDE)
    path, _ = new_project(FLOWS, HANDLERS)
    async with beside_runner(path, redis_url) as client:
        yield Asking(client, path, redis_client, key_prefix)


def _auth(token: str = HAROLD) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_reply_comes_back(asking: Asking) -> None:
    """200 with what the handler returned; the gateway's replies share one reply stream."""
    http = asking.http
    answers = await asyncio.gather(
        *(http.post("/v1/requests/ask?timeout=10", json={"n": n}, headers=_auth()) for n in "123")
    )
    assert [r.status for r in answers] == [200, 200, 200]
    assert [await r.json() for r in answers] == [{"reply": {"n": n}} for n in (2, 4, 6)]


async def test_no_reply_in_time_is_504(asking: Asking) -> None:
    late = await asking.http.post("/v1/requests/slow?timeout=0.2", json={}, headers=_auth())
    assert late.status == 504
    body = await late.json()
    assert "within 0.2s" in body["error"] and "?timeout=" in body["fix"]


async def test_a_dead_lettered_request_is_502_with_the_reason(asking: Asking) -> None:
    failed = await asking.http.post(
        "/v1/requests/ask?timeout=10", json={"op": "fail"}, headers=_auth()
    )
    assert failed.status == 502
    body = await failed.json()
    assert "no good" in body["reason"] and body["id"]
    assert await asking.redis.xlen(f"{asking.prefix}dlq") == 1


async def test_a_canceled_request_is_409(asking: Asking) -> None:
    http = asking.http
    call = asyncio.ensure_future(
        http.post("/v1/requests/slow?timeout=20", json={"sleep": "20"}, headers=_auth())
    )
    key = f"{asking.prefix}slow"
    entries = await wait_for(lambda: asking.redis.xrange(key), what="the request published")
    async with Client.from_config(asking.config) as client:
        assert await client.cancel(entries[0][0], stream="slow")
    resp = await call
    assert resp.status == 409, await resp.text()
    assert "cancel" in (await resp.json())["error"]


async def test_refusals(asking: Asking) -> None:
    """401 without a token, 403 past may_send, 400 for a bad timeout, stream or body."""
    http = asking.http
    none = await http.post("/v1/requests/ask", json={})
    wrong = await http.post("/v1/requests/ask", json={}, headers=_auth("x" * 30))
    maude = await http.post("/v1/requests/ask", json={}, headers=_auth(MAUDE))
    zero = await http.post("/v1/requests/ask?timeout=0", json={}, headers=_auth())
    big = await http.post("/v1/requests/ask?timeout=9999", json={}, headers=_auth())
    word = await http.post("/v1/requests/ask?timeout=soon", json={}, headers=_auth())
    unknown = await http.post("/v1/requests/nope", json={}, headers=_auth())
    text = await http.post("/v1/requests/ask", data="hi", headers=_auth())
    statuses = [r.status for r in (none, wrong, maude, zero, big, word, unknown, text)]
    assert statuses == [401, 401, 403, 400, 400, 400, 400, 415]
    assert "may_send" in (await maude.json())["fix"]
    assert "max_request_timeout" in (await big.json())["error"]
    assert (await unknown.json())["about"] == "stream"
    assert await asking.redis.xlen(f"{asking.prefix}ask") == 0  # nothing refused was sent


async def test_a_reload_keeps_the_requests_in_flight(
    new_project: NewProject, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flows reloaded (a new project) while a request waits: its reply still comes,
    through the same reply stream, and the next request uses the new flows."""
    monkeypatch.setenv("HAROLD_TOKEN", HAROLD)
    monkeypatch.setenv("MAUDE_TOKEN", MAUDE)
    path, _ = new_project(FLOWS, HANDLERS)
    current = [load_project(path)]
    gateway = Gateway(lambda: current[0], lambda: connect(redis_url))
    async with running(path, grace=0.5):
        http = TestClient(TestServer(gateway.app()))
        await http.start_server()
        try:
            slow = asyncio.ensure_future(
                http.post("/v1/requests/slow?timeout=20", json={"sleep": "0.5"}, headers=_auth())
            )
            await wait_for(lambda: gateway._asker is not None, what="the request asked")
            asker = gateway._asker
            current[0] = load_project(path)  # as a reload does
            again = await http.post("/v1/requests/ask", json={"n": "1"}, headers=_auth())
            assert (await again.json()) == {"reply": {"n": 2}}
            assert gateway._asker is asker and asker.project is current[0]
            assert (await (await slow).json()) == {"reply": {"late": True}}
        finally:
            await http.close()
            await gateway.stop()
