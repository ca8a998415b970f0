"""The inbox through the gateway: WebSocket with credit, long polling, and what a drop keeps."""

from __future__ import annotations

from typing import Any

from aiohttp import ClientWebSocketResponse
from conftest import MAUDE, Served
from projects import wait_for


async def _fill(served: Served, count: int, agent: str = "harold") -> list[str]:
    key = f"{served.prefix}inbox:{agent}"
    return [await served.redis.xadd(key, {"n": str(i)}) for i in range(count)]


async def _pending(served: Served) -> int:
    info = await served.redis.xpending(f"{served.prefix}inbox:harold", "harold")
    return int(info["pending"])


async def _receive(ws: ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    frames = []
    while len(frames) < count:
        frame = await ws.receive_json(timeout=10)
        assert frame["type"] == "message", frame
        frames.append(frame)
    return frames


async def _settled(ws: ClientWebSocketResponse, kind: str, entry_id: str) -> None:
    frame = await ws.receive_json(timeout=10)
    assert frame == {"type": kind, "id": entry_id}


async def test_credit_bounds_what_is_pushed(served: Served) -> None:
    """With credit 3 the gateway pushes 3 (3 pending); an ack and one more credit bring one."""
    ids = await _fill(served, 10)
    async with served.http.ws_connect("/v1/agents/harold/inbox", headers=served.auth()) as ws:
        await ws.send_json({"credit": 3})
        first = await _receive(ws, 3)
        assert [f["id"] for f in first] == ids[:3]
        assert first[0]["msg"] == {"n": "0"} and first[0]["deliveries"] == 1
        assert await _pending(served) == 3
        await ws.send_json({"ack": ids[0]})
        await _settled(ws, "acked", ids[0])
        await ws.send_json({"credit": 1})
        assert [f["id"] for f in await _receive(ws, 1)] == [ids[3]]
        assert await _pending(served) == 3


async def test_a_client_that_never_reads_holds_at_most_max_credit(served: Served) -> None:
    """Credit past gateway.max_credit (5 here) is clipped: 5 pushed and pending, no more,
    until one is settled: a slow client costs bounded memory."""
    ids = await _fill(served, 20)
    async with served.http.ws_connect("/v1/agents/harold/inbox", headers=served.auth()) as ws:
        await ws.send_json({"credit": 1000})
        await wait_for(lambda: _equals(_pending(served), 5), what="5 pending")
        got = await _receive(ws, 5)
        await ws.send_json({"ack": got[0]["id"]})
        await _settled(ws, "acked", got[0]["id"])
        assert [f["id"] for f in await _receive(ws, 1)] == [ids[5]]
        assert await _pending(served) == 5


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_dropped_socket_loses_nothing_and_repeats_nothing_acked(served: Served) -> None:
    """Pushed and unacked entries come again on the next connection; acked ones never do."""
    ids = await _fill(served, 12)
    handled: list[str] = []
    async with served.http.ws_connect("/v1/agents/harold/inbox", headers=served.auth()) as ws:
        await ws.send_json({"credit": 5})
        for frame in await _receive(ws, 5):
            if len(handled) < 3:
                await ws.send_json({"ack": frame["id"]})
                await _settled(ws, "acked", frame["id"])
                handled.append(frame["id"])
    # dropped with two pushed and not acked
    async with served.http.ws_connect("/v1/agents/harold/inbox", headers=served.auth()) as ws:
        await ws.send_json({"credit": 5})
        while len(handled) < 12:
            frame = await ws.receive_json(timeout=10)
            if frame["type"] == "acked":
                handled.append(frame["id"])
                await ws.send_json({"credit": 1})
                continue
            assert frame["type"] == "message", frame
            assert frame["id"] not in handled, "an acked entry came again"
            if frame["id"] in ids[3:5]:
                assert frame["deliveries"] == 2
            await ws.send_json({"ack": frame["id"]})
    assert sorted(handled) == sorted(ids)
    assert await _pending(served) == 0


async def test_fail_retries_then_dead_letters(served: Served) -> None:
    """A failed entry comes again after its backoff; at max_deliveries (3) it is dead-lettered."""
    [entry_id] = await _fill(served, 1)
    async with served.http.ws_connect("/v1/agents/harold/inbox", headers=served.auth()) as ws:
        await ws.send_json({"credit": 10})
        for delivery in (1, 2, 3):
            [frame] = await _receive(ws, 1)
            assert (frame["id"], frame["deliveries"]) == (entry_id, delivery)
            await ws.send_json({"fail": entry_id, "error": "model overloaded"})
            await _settled(ws, "failed", entry_id)
    [(_, dead)] = await served.redis.xrange(f"{served.prefix}dlq")
    assert dead["dlq_error"] == "model overloaded" and dead["n"] == "0"
    assert await _pending(served) == 0


async def test_bad_frames_are_answered_not_fatal(served: Served) -> None:
    """Text that is not JSON, bad credit, unknown IDs and frames: an error frame each."""
    async with served.http.ws_connect("/v1/agents/harold/inbox", headers=served.auth()) as ws:
        for sent in ("{nope", '{"credit": -1}', '{"ack": "1-1"}', '{"hello": 1}', "[1]"):
            await ws.send_str(sent)
            frame = await ws.receive_json(timeout=10)
            assert frame["type"] == "error", (sent, frame)
        [entry_id] = await _fill(served, 1)
        await ws.send_json({"credit": 1})
        assert [f["id"] for f in await _receive(ws, 1)] == [entry_id]


async def test_only_the_agents_own_inbox(served: Served) -> None:
    """Another agent's inbox is 403, no token 401, both before any upgrade."""
    other = await served.http.get("/v1/agents/maude/inbox", headers=served.auth())
    none = await served.http.get("/v1/agents/harold/inbox")
    assert (other.status, none.status) == (403, 401)
    undeclared = await served.http.get("/v1/agents/maude/inbox?wait=0", headers=served.auth(MAUDE))
    assert undeclared.status == 200  # maude reads its own: a long poll that found nothing
    assert (await undeclared.json())["messages"] == []


async def test_long_poll_and_ack(served: Served) -> None:
    """Without Upgrade, GET returns messages; POST .../inbox/ack settles them; the next poll
    goes on from there and returns nothing twice."""
    ids = await _fill(served, 4)
    auth = served.auth()
    first = await (
        await served.http.get("/v1/agents/harold/inbox?count=3&wait=1", headers=auth)
    ).json()
    assert [m["id"] for m in first["messages"]] == ids[:3]
    acked = await served.http.post(
        "/v1/agents/harold/inbox/ack",
        json={"ack": ids[:3], "fail": "9-9", "error": "x"},
        headers=auth,
    )
    assert await acked.json() == {"acked": ids[:3], "failed": [], "unknown": ["9-9"]}
    second = await (await served.http.get("/v1/agents/harold/inbox?wait=1", headers=auth)).json()
    assert [m["id"] for m in second["messages"]] == ids[3:]
    bad = await served.http.get("/v1/agents/harold/inbox?count=zero", headers=auth)
    assert bad.status == 400
    assert await _pending(served) == 1


async def test_several_acked_in_one_frame(served: Served) -> None:
    """`{"ack": [ids]}` settles them with one reply naming them (and any not held)."""
    ids = await _fill(served, 3)
    async with served.http.ws_connect("/v1/agents/harold/inbox", headers=served.auth()) as ws:
        await ws.send_json({"credit": 3})
        await _receive(ws, 3)
        await ws.send_json({"ack": [*ids, "7-7"]})
        assert await ws.receive_json(timeout=10) == {
            "type": "acked",
            "ids": ids,
            "unknown": ["7-7"],
        }
    assert await _pending(served) == 0


async def test_a_new_socket_replaces_the_agents_earlier_one(served: Served) -> None:
    """A second connection of the agent closes the first (code 4000) and gets what the
    first held and did not ack; it is never handed to both at once."""
    ids = await _fill(served, 2)
    auth = served.auth()
    async with served.http.ws_connect("/v1/agents/harold/inbox", headers=auth) as first:
        await first.send_json({"credit": 2})
        assert [f["id"] for f in await _receive(first, 2)] == ids
        async with served.http.ws_connect("/v1/agents/harold/inbox", headers=auth) as second:
            closing = await first.receive(timeout=10)
            assert closing.data == 4000, closing
            await second.send_json({"credit": 5})
            again = await _receive(second, 2)
            assert [(f["id"], f["deliveries"]) for f in again] == [(i, 2) for i in ids]


async def test_a_browser_offers_its_token_as_a_subprotocol(served: Served) -> None:
    """Without headers (a browser), the token comes as the subprotocol
    cortex-flow.bearer.<token>; the gateway answers cortex-flow. A wrong one is 401."""
    from conftest import HAROLD

    [entry_id] = await _fill(served, 1)
    offered = ("cortex-flow", f"cortex-flow.bearer.{HAROLD}")
    async with served.http.ws_connect("/v1/agents/harold/inbox", protocols=offered) as ws:
        assert ws.protocol == "cortex-flow"
        await ws.send_json({"credit": 1})
        assert [f["id"] for f in await _receive(ws, 1)] == [entry_id]
    wrong = await served.http.get(
        "/v1/agents/harold/inbox",
        headers={"Sec-WebSocket-Protocol": "cortex-flow, cortex-flow.bearer.nope-nope-nope-nope"},
    )
    assert wrong.status == 401


async def test_a_frame_over_max_body_closes_the_socket_and_loses_nothing(served: Served) -> None:
    """A frame larger than gateway.max_body (64 KiB here) closes the socket with 1009; what
    was pushed stays pending and comes again on the next connection."""
    from aiohttp import WSMsgType

    [entry_id] = await _fill(served, 1)
    async with served.http.ws_connect("/v1/agents/harold/inbox", headers=served.auth()) as ws:
        await ws.send_json({"credit": 1})
        await _receive(ws, 1)
        await ws.send_str('{"ack": "' + "x" * 100_000 + '"}')
        closing = await ws.receive(timeout=10)
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert ws.close_code == 1009
    async with served.http.ws_connect("/v1/agents/harold/inbox", headers=served.auth()) as ws:
        await ws.send_json({"credit": 1})
        assert [(f["id"], f["deliveries"]) for f in await _receive(ws, 1)] == [(entry_id, 2)]
