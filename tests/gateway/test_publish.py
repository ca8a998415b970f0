"""Publishing and beating through the gateway, and every refusal on the way."""

from __future__ import annotations

import json

from conftest import HAROLD, MAUDE, Served


async def test_publish_returns_202_with_the_entry_id(served: Served) -> None:
    """POST /v1/streams/tasks puts the JSON object on the priority's key; 202 names the ID."""
    resp = await served.http.post(
        "/v1/streams/tasks?priority=high", json={"type": "batch", "job": "7"}, headers=served.auth()
    )
    assert resp.status == 202
    body = await resp.json()
    entries = await served.redis.xrange(f"{served.prefix}tasks:high")
    assert [(i, f) for i, f in entries] == [(body["id"], {"type": "batch", "job": "7"})]
    assert body["key"] == f"{served.prefix}tasks:high"


async def test_publish_to_a_json_stream_and_an_agents_key(served: Served) -> None:
    """A json stream gets one `data` field; `agent` picks a per-agent key."""
    notes = await served.http.post("/v1/streams/notes", json={"n": [1, 2]}, headers=served.auth())
    inbox = await served.http.post(
        "/v1/streams/inbox?agent=maude", json={"hi": "there"}, headers=served.auth()
    )
    assert (notes.status, inbox.status) == (202, 202)
    [(_, fields)] = await served.redis.xrange(f"{served.prefix}notes")
    assert json.loads(fields["data"]) == {"n": [1, 2]}
    [(entry_id, _)] = await served.redis.xrange(f"{served.prefix}inbox:maude")
    assert entry_id == (await inbox.json())["id"]


async def test_publish_errors_are_sends_as_json_400(served: Served) -> None:
    """A wrong priority, a missing agent and an unknown stream answer 400 with send's words."""
    cases = {
        "/v1/streams/tasks?priority=urgent": (
            "priority",
            "priority must be one of high, normal, low, got 'urgent'",
        ),
        "/v1/streams/inbox": (
            "agent",
            'stream "inbox" has one key per agent; name the agent (harold, maude, scout)',
        ),
        "/v1/streams/taks": ("stream", '"taks" is not a declared stream; did you mean "tasks"?'),
    }
    for path, (about, error) in cases.items():
        resp = await served.http.post(path, json={"a": "b"}, headers=served.auth())
        body = await resp.json()
        assert (resp.status, body["about"]) == (400, about), path
        assert body["error"].startswith(error), body


async def test_idempotency_key_publishes_once(served: Served) -> None:
    """The same Idempotency-Key answers the first entry's ID and adds nothing."""
    headers = {**served.auth(), "Idempotency-Key": "order-17"}
    first = await (
        await served.http.post("/v1/streams/tasks", json={"a": "1"}, headers=headers)
    ).json()
    again = await (
        await served.http.post("/v1/streams/tasks", json={"a": "2"}, headers=headers)
    ).json()
    other = await served.http.post(
        "/v1/streams/tasks", json={"a": "3"}, headers={**headers, "Idempotency-Key": "order-18"}
    )
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert again["id"] == first["id"]
    entries = await served.redis.xrange(f"{served.prefix}tasks:normal")
    assert [f["a"] for _, f in entries] == ["1", "3"]
    assert other.status == 202


async def test_bad_bodies(served: Served) -> None:
    """Malformed JSON and a non-object are 400, another content type 415, a big body 413."""
    post = served.http.post
    auth = served.auth()
    bad = await post(
        "/v1/streams/tasks", data=b"{nope", headers={**auth, "Content-Type": "application/json"}
    )
    listed = await post("/v1/streams/tasks", json=[1, 2], headers=auth)
    form = await post("/v1/streams/tasks", data={"a": "b"}, headers=auth)
    empty = await post("/v1/streams/tasks", headers=auth)
    huge = await post(
        "/v1/streams/tasks",
        data=b'{"a": "' + b"x" * (10 * 1024 * 1024) + b'"}',
        headers={**auth, "Content-Type": "application/json"},
    )
    assert bad.status == 400 and "not valid JSON" in (await bad.json())["error"]
    assert listed.status == 400 and "JSON object" in (await listed.json())["error"]
    assert form.status == 415 and "application/json" in (await form.json())["fix"]
    assert empty.status == 400
    assert huge.status == 413 and "error" in await huge.json()
    assert await served.redis.exists(f"{served.prefix}tasks:normal") == 0


async def test_no_token_wrong_token_and_not_allowed(served: Served) -> None:
    """401 without a token or with one no agent has; 403 for a stream not in may_send."""
    none = await served.http.post("/v1/streams/tasks", json={})
    wrong = await served.http.post(
        "/v1/streams/tasks", json={}, headers={"Authorization": "Bearer " + "x" * 30}
    )
    basic = await served.http.post(
        "/v1/streams/tasks", json={}, headers={"Authorization": "Basic " + HAROLD}
    )
    maude = await served.http.post("/v1/streams/tasks", json={}, headers=served.auth(MAUDE))
    assert [r.status for r in (none, wrong, basic, maude)] == [401, 401, 401, 403]
    assert none.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await none.json())["error"] == "this endpoint needs an agent's token"
    assert (await wrong.json())["error"] == "not an agent's token"
    refused = await maude.json()
    assert refused["error"] == "agent maude may not send to stream tasks"
    assert "agents.maude.may_send" in refused["fix"]
    for resp in (none, wrong, basic, maude):
        assert HAROLD not in await resp.text() and MAUDE not in await resp.text()


async def test_heartbeat_and_another_agents_path(served: Served) -> None:
    """An agent beats as itself (202, a beat in the stream); another agent's path is 403."""
    resp = await served.http.post(
        "/v1/agents/harold/heartbeat", json={"status": "busy"}, headers=served.auth()
    )
    plain = await served.http.post("/v1/agents/harold/heartbeat", headers=served.auth())
    other = await served.http.post("/v1/agents/maude/heartbeat", headers=served.auth())
    assert (resp.status, plain.status, other.status) == (202, 202, 403)
    beats = await served.redis.xrange(f"{served.prefix}heartbeats")
    assert [(f["agent"], f["status"]) for _, f in beats] == [("harold", "busy"), ("harold", "ok")]
    assert (await other.json())["error"] == "the token is agent harold's, not agent maude's"


async def test_open_paths_unknown_paths_and_foreign_hosts(served: Served) -> None:
    """/ and /openapi.json need no token; unknown paths are JSON 404s; a foreign Host is 403."""
    index = await served.http.get("/")
    doc = await served.http.get("/openapi.json")
    missing = await served.http.get("/v1/nothing", headers=served.auth())
    rebound = await served.http.get("/", headers={"Host": "evil.example:80"})
    assert (index.status, doc.status, missing.status, rebound.status) == (200, 200, 404, 403)
    assert "POST /v1/streams/{stream}" in (await index.json())["endpoints"]
    assert "/v1/agents/{agent}/inbox" in (await doc.json())["paths"]
    assert "error" in await missing.json()
