"""Routing, retries and dead-lettering against a real Redis server."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from projects import (
    NewProject,
    entries,
    equals,
    make_project,
    module,
    none_pending,
    peak_handlers,
    pending,
    running,
    wait_for,
    write_module,
)


async def test_to_routes_by_agent_and_unmatched_goes_to_dlq(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """`to` with vars reaches each agent's inbox; a missing field or no match dead-letters."""
    config, _ = new_project(
        """
        version: 1
        streams:
          in: {key: "{P}in"}
          inbox: {key: "{P}messages:{{ agent }}"}
          other: {key: "{P}other"}
          dlq: {key: "{P}dlq"}
        agents: {alice: {}, bob: {}}
        groups:
          router:
            stream: in
            dead_letter: dlq
            routes:
              - when: "msg.to in agents"
                to: inbox
                vars: {agent: "{{ msg.to }}"}
              - when: "msg.kind == 'misc'"
                to: other
        """,
    )
    async with running(config):
        src = f"{key_prefix}in"
        await redis_client.xadd(src, {"to": "alice", "text": "hi"})
        await redis_client.xadd(src, {"to": "bob", "text": "yo"})
        await redis_client.xadd(src, {"to": "carol", "kind": "misc"})  # not an agent
        await redis_client.xadd(src, {"kind": "misc"})  # no `to`: the first route does not match
        lost = await redis_client.xadd(src, {"text": "neither to nor kind"})
        await wait_for(
            lambda: redis_client.xlen(f"{key_prefix}dlq"), what="the unmatched entry in the DLQ"
        )
        await wait_for(
            lambda: equals(redis_client.xlen(f"{key_prefix}other"), 2), what="the misc entries"
        )
        assert [f for _, f in await entries(redis_client, f"{key_prefix}messages:alice")] == [
            {"to": "alice", "text": "hi"}
        ]
        assert [f for _, f in await entries(redis_client, f"{key_prefix}messages:bob")] == [
            {"to": "bob", "text": "yo"}
        ]
        assert [f for _, f in await entries(redis_client, f"{key_prefix}other")] == [
            {"to": "carol", "kind": "misc"},
            {"kind": "misc"},
        ]
        [(_, dead)] = await entries(redis_client, f"{key_prefix}dlq")
        assert dead["dlq_id"] == lost
        assert dead["dlq_error"] == "no route matched"
        assert dead["text"] == "neither to nor kind"
        await wait_for(lambda: none_pending(redis_client, src, "router"), what="nothing pending")


async def test_set_json_codecs_drop_and_continue(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """`set` builds a new message, json decodes in and encodes out, drop acks, continue fans out."""
    config, _ = new_project(
        """
        version: 1
        streams:
          in: {key: "{P}in", codec: json}
          replies: {key: "{P}replies", codec: json}
          audit: {key: "{P}audit"}
        groups:
          g:
            stream: in
            routes:
              - when: "msg.type == 'noise'"
                drop: true
              - to: audit
                continue: true
                set: {seen: "{{ msg.type }}", user: "{{ msg.user.name }}"}
              - when: "msg.type == 'ask'"
                to: replies
                set: {kind: reply, text: "{{ msg.text | upper }}", to: "{{ msg.user.name }}"}
              - to: replies
        """,
    )
    src = f"{key_prefix}in"
    note = {"type": "note", "n": 3, "user": {"name": "bo"}, "tags": ["a", "b"]}
    async with running(config):
        await redis_client.xadd(src, {"data": json.dumps({"type": "noise"})})
        await redis_client.xadd(
            src, {"data": json.dumps({"type": "ask", "text": "hi", "user": {"name": "ann"}})}
        )
        await redis_client.xadd(src, {"data": json.dumps(note)})
        await wait_for(
            lambda: equals(redis_client.xlen(f"{key_prefix}replies"), 2), what="two replies"
        )
        await wait_for(lambda: none_pending(redis_client, src, "g"), what="nothing pending")
    replies = [f for _, f in await entries(redis_client, f"{key_prefix}replies")]
    assert [set(r) for r in replies] == [{"data"}, {"data"}]
    assert json.loads(replies[0]["data"]) == {"kind": "reply", "text": "HI", "to": "ann"}
    assert json.loads(replies[1]["data"]) == note  # passed through, types intact
    audit = [f for _, f in await entries(redis_client, f"{key_prefix}audit")]
    assert audit == [{"seen": "ask", "user": "ann"}, {"seen": "note", "user": "bo"}]


HANDLERS = """
    import asyncio
    import threading

    seen = []

    def sync(msg):
        seen.append(("sync", msg["n"], threading.get_ident(), threading.current_thread().name))

    def inline(msg):
        seen.append(("inline", msg["n"], threading.get_ident(), ""))

    async def coro(msg):
        await asyncio.sleep(0.01)
        seen.append(("async", msg["n"], threading.get_ident(), ""))
"""


async def test_call_sync_in_thread_inline_and_async(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """Sync calls run in a worker thread, inline ones and async ones on the event loop."""
    config, mod = new_project(
        """
        version: 1
        streams:
          mixed: {key: "{P}mixed"}
          fast: {key: "{P}fast"}
        groups:
          mixed:
            stream: mixed
            routes:
              - when: "msg.kind == 'sync'"
                call: {M}:sync
              - when: "msg.kind == 'inline'"
                call: {function: "{M}:inline", inline: true}
              - call: {M}:coro
          fast:
            stream: fast
            routes:
              - call: {function: "{M}:inline", inline: true}
        """,
        HANDLERS,
    )
    loop_thread = threading.get_ident()
    async with running(config):
        seen = module(mod).seen
        for n, kind in enumerate(["sync", "inline", "async"]):
            await redis_client.xadd(f"{key_prefix}mixed", {"kind": kind, "n": str(n)})
        for n in range(3, 6):
            await redis_client.xadd(f"{key_prefix}fast", {"n": str(n)})
        await wait_for(lambda: len(seen) == 6, what="six calls")
        for key, group in ((f"{key_prefix}mixed", "mixed"), (f"{key_prefix}fast", "fast")):
            await wait_for(
                lambda k=key, g=group: none_pending(redis_client, k, g), what="all acked"
            )
    by_n = {n: (kind, ident, name) for kind, n, ident, name in seen}
    assert by_n["0"][0] == "sync" and by_n["0"][1] != loop_thread
    assert by_n["0"][2].startswith("cortex-call")
    assert by_n["1"][:2] == ("inline", loop_thread)
    assert by_n["2"][:2] == ("async", loop_thread)
    assert all(by_n[str(n)][:2] == ("inline", loop_thread) for n in range(3, 6))


@pytest.fixture
async def http_server() -> AsyncIterator[tuple[str, dict[str, list[dict[str, Any]]]]]:
    """A local HTTP endpoint: /ok answers 200, /flaky 500 the first time per message, /down 500."""
    posted: dict[str, list[dict[str, Any]]] = {"ok": [], "flaky": [], "down": []}

    async def ok(request: web.Request) -> web.Response:
        posted["ok"].append(await request.json())
        return web.json_response({"ok": True})

    async def flaky(request: web.Request) -> web.Response:
        body = await request.json()
        posted["flaky"].append(body)
        first = sum(1 for b in posted["flaky"] if b["n"] == body["n"]) == 1
        return web.Response(status=500, text="try later") if first else web.Response(text="ok")

    async def down(request: web.Request) -> web.Response:
        posted["down"].append(await request.json())
        return web.Response(status=500, text="always broken")

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/flaky", flaky)
    app.router.add_post("/down", down)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", posted
    finally:
        await runner.cleanup()


async def test_http_route_posts_json_and_retries_on_500(
    new_project: NewProject,
    redis_client: Any,
    key_prefix: str,
    http_server: tuple[str, dict[str, list[dict[str, Any]]]],
) -> None:
    """An http route POSTs the message; a 2xx acks, a 500 is retried, always-500 dead-letters."""
    base, posted = http_server
    config, _ = new_project(
        f"""
        version: 1
        streams:
          in: {{key: "{{P}}in"}}
          dlq: {{key: "{{P}}dlq"}}
        groups:
          bridge:
            stream: in
            dead_letter: dlq
            retry: {{max_deliveries: 2, backoff: {{initial: 100ms, max: 200ms}}}}
            routes:
              - when: "msg.kind == 'ok'"
                http: {{url: "{base}/ok", timeout: 5s}}
              - when: "msg.kind == 'flaky'"
                http: {{url: "{base}/flaky", timeout: 5s}}
              - http: {{url: "{base}/down", timeout: 5s}}
        """,
    )
    src = f"{key_prefix}in"
    async with running(config):
        await redis_client.xadd(src, {"kind": "ok", "n": "1"})
        await redis_client.xadd(src, {"kind": "flaky", "n": "2"})
        down = await redis_client.xadd(src, {"kind": "down", "n": "3"})
        await wait_for(lambda: redis_client.xlen(f"{key_prefix}dlq"), what="a dead letter")
        await wait_for(lambda: len(posted["flaky"]) == 2, what="the retried POST")
        await wait_for(lambda: none_pending(redis_client, src, "bridge"), what="nothing pending")
    assert posted["ok"] == [{"kind": "ok", "n": "1"}]
    assert posted["flaky"] == [{"kind": "flaky", "n": "2"}] * 2
    assert len(posted["down"]) == 2
    [(_, dead)] = await entries(redis_client, f"{key_prefix}dlq")
    assert dead["dlq_id"] == down and dead["dlq_deliveries"] == "2"
    assert "HTTP 500" in dead["dlq_error"] and "always broken" in dead["dlq_error"]


FAILING = """
    import threading

    lock = threading.Lock()
    good = []
    bad_calls = []
    decoded = []

    def handle(msg):
        if msg["n"] == "bad":
            with lock:
                bad_calls.append(dict(msg))
            msg.pop("payload", None)  # a handler changing its message before failing
            msg["junk"] = "added"
            raise ValueError("boom")
        with lock:
            good.append(msg["n"])

    def handle_json(msg):
        decoded.append(msg)
"""


async def test_retry_then_dead_letter_with_metadata(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """A failing message is retried to max_deliveries, then dead-lettered with all metadata."""
    config, mod = new_project(
        """
        version: 1
        streams:
          jobs: {key: "{P}jobs"}
          dlq: {key: "{P}dlq"}
        groups:
          work:
            stream: jobs
            concurrency: 2
            dead_letter: dlq
            retry: {max_deliveries: 3, backoff: {initial: 100ms, max: 200ms}}
            routes:
              - call: {M}:handle
        """,
        FAILING,
    )
    src = f"{key_prefix}jobs"
    bad = await redis_client.xadd(src, {"n": "bad", "payload": "keep me"})
    for n in range(20):
        await redis_client.xadd(src, {"n": str(n)})
    async with running(config):
        handlers = module(mod)
        await wait_for(lambda: redis_client.xlen(f"{key_prefix}dlq"), what="the dead letter")
        await wait_for(lambda: len(handlers.good) == 20, what="the good messages")
        await wait_for(lambda: none_pending(redis_client, src, "work"), what="nothing pending")
    assert sorted(handlers.good, key=int) == [str(n) for n in range(20)]
    assert len(handlers.bad_calls) == 3
    [(_, dead)] = await entries(redis_client, f"{key_prefix}dlq")
    at = dead.pop("dlq_at")
    assert datetime.fromisoformat(at).tzinfo is not None
    error = dead.pop("dlq_error")
    assert "ValueError: boom" in error
    assert dead == {
        "n": "bad",
        "payload": "keep me",
        "dlq_stream": src,
        "dlq_id": bad,
        "dlq_group": "work",
        "dlq_deliveries": "3",
    }


async def test_undecodable_entry_is_dead_lettered_at_once(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """An entry a json stream cannot decode goes to the DLQ on its first delivery."""
    config, mod = new_project(
        """
        version: 1
        streams:
          jobs: {key: "{P}jobs", codec: json}
          dlq: {key: "{P}dlq"}
        groups:
          work:
            stream: jobs
            dead_letter: dlq
            retry: {max_deliveries: 5, backoff: {initial: 100ms}}
            routes:
              - call: {M}:handle_json
        """,
        FAILING,
    )
    src = f"{key_prefix}jobs"
    broken = await redis_client.xadd(src, {"data": "{not json"})
    await redis_client.xadd(src, {"data": json.dumps({"n": 1, "ok": True})})
    async with running(config):
        handlers = module(mod)
        await wait_for(lambda: redis_client.xlen(f"{key_prefix}dlq"), what="the dead letter")
        await wait_for(lambda: handlers.decoded, what="the good message")
        await wait_for(lambda: none_pending(redis_client, src, "work"), what="nothing pending")
    assert handlers.decoded == [{"n": 1, "ok": True}]
    [(_, dead)] = await entries(redis_client, f"{key_prefix}dlq")
    assert dead["dlq_id"] == broken and dead["dlq_deliveries"] == "1"
    assert dead["data"] == "{not json"
    assert dead["dlq_error"].startswith("cannot decode: json codec: `data` is not valid JSON")


async def test_restart_first_rereads_own_pending_and_dead_letters_crash_loops(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """On start a runner takes back its own pending at once; one delivered max times dies."""
    config, mod = new_project(
        """
        version: 1
        streams:
          jobs: {key: "{P}jobs"}
          dlq: {key: "{P}dlq"}
        groups:
          work:
            stream: jobs
            dead_letter: dlq
            retry: {max_deliveries: 3, claim_idle: 1h}
            routes:
              - call: {M}:handle
        """,
        FAILING,
        name="stable",
    )
    src = f"{key_prefix}jobs"
    await redis_client.xgroup_create(src, "work", id="0", mkstream=True)
    ids = [await redis_client.xadd(src, {"n": str(n)}) for n in range(4)]
    # a previous run of this runner read them all and crashed; the last one crashed it 3 times
    await redis_client.xreadgroup("work", "stable", {src: ">"})
    await redis_client.xclaim(src, "work", "stable", 0, [ids[3]], retrycount=3)
    async with running(config):
        handlers = module(mod)
        await wait_for(lambda: sorted(handlers.good) == ["0", "1", "2"], what="the pending ones")
        await wait_for(lambda: redis_client.xlen(f"{key_prefix}dlq"), what="the crash loop")
        await wait_for(lambda: none_pending(redis_client, src, "work"), what="nothing pending")
    [(_, dead)] = await entries(redis_client, f"{key_prefix}dlq")
    assert (dead["n"], dead["dlq_id"], dead["dlq_deliveries"]) == ("3", ids[3], "3")
    assert dead["dlq_error"] == "delivered 3 times; 3 runners died holding it"


async def test_dead_letters_respect_the_dlq_maxlen(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """Dead letters are trimmed to the dead-letter stream's maxlen by retention (no group
    reads it: length alone decides), not at publish."""
    config, _ = new_project(
        """
        version: 1
        streams:
          jobs: {key: "{P}jobs", codec: json}
          dlq: {key: "{P}dlq", maxlen: 20}
        groups:
          work:
            stream: jobs
            dead_letter: dlq
            routes:
              - call: {M}:handle_json
        """,
        FAILING,
        runner_extra=", retention_interval: 100ms",
    )
    src = f"{key_prefix}jobs"
    pipe = redis_client.pipeline(transaction=False)
    for n in range(400):
        pipe.xadd(src, {"data": f"broken {n}"})
    await pipe.execute()
    async with running(config) as runner:
        stats = runner.stats.groups["work"].keys[src]
        await wait_for(lambda: stats.dead_lettered == 400, what="400 dead letters")
        await wait_for(lambda: none_pending(redis_client, src, "work"), what="nothing pending")
        await wait_for(lambda: equals(redis_client.xlen(f"{key_prefix}dlq"), 20), what="trim")
        assert runner.stats.trimmed[f"{key_prefix}dlq"] == 380


async def test_claimed_and_reread_entries_respect_concurrency(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """Own pending re-read at start and entries claimed from others never exceed concurrency."""
    config, mod = new_project(
        """
        version: 1
        streams:
          jobs: {key: "{P}jobs"}
        groups:
          work:
            stream: jobs
            concurrency: 3
            retry: {backoff: {initial: 100ms}, claim_idle: 200ms}
            routes:
              - call: {M}:handle
        """,
        peak_handlers(0.02),
    )
    src = f"{key_prefix}jobs"
    await redis_client.xgroup_create(src, "work", id="0", mkstream=True)
    for n in range(60):
        await redis_client.xadd(src, {"n": str(n)})
    await redis_client.xreadgroup("work", "t1", {src: ">"}, count=20)  # ours, from a past run
    await redis_client.xreadgroup("work", "ghost", {src: ">"}, count=20)  # a crashed one's
    async with running(config):
        handlers = module(mod)
        await wait_for(lambda: len(set(handlers.handled)) == 60, what="all 60")
        await wait_for(lambda: none_pending(redis_client, src, "work"), what="nothing pending")
    assert handlers.peak <= 3


BACKED_OFF = """
    calls = []

    def handle(msg):
        calls.append(msg["n"])
        if msg["n"].startswith("old") or calls.count(msg["n"]) == 1:
            raise ValueError("not yet")
"""


async def test_entry_due_for_retry_is_not_hidden_by_older_ones_backing_off(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """A failed entry is retried after its backoff though a batch of older ones waits longer."""
    config, mod = new_project(
        """
        version: 1
        streams:
          jobs: {key: "{P}jobs"}
        groups:
          work:
            stream: jobs
            batch: 5
            concurrency: 5
            retry:
              max_deliveries: 10
              backoff: {initial: 100ms, multiplier: 100, max: 1h}
              claim_idle: 1h
            routes:
              - call: {M}:handle
        """,
        BACKED_OFF,
    )
    src = f"{key_prefix}jobs"
    async with running(config):
        calls = module(mod).calls
        for n in range(5):  # a whole batch of older entries: after two failures, 10s backoff
            await redis_client.xadd(src, {"n": f"old{n}"})
        await wait_for(lambda: len(calls) == 10, what="two deliveries of the old ones")
        await redis_client.xadd(src, {"n": "fresh"})  # fails once, due again after 100ms
        await wait_for(lambda: calls.count("fresh") == 2, what="the retry of the fresh entry")
        await wait_for(lambda: equals(pending(redis_client, src, "work"), 5), what="its ack")
    assert sorted(calls) == sorted([f"old{n}" for n in range(5)] * 2 + ["fresh"] * 2)


BARRIER = """
    import threading

    barriers = {"narrow": threading.Barrier(4, timeout=5), "wide": threading.Barrier(40, timeout=5)}
    passed = []

    def handle(msg):
        barriers[msg["g"]].wait()  # breaks unless every handler of the group has a thread
        passed.append((msg["g"], msg["n"]))
"""

NARROW = """
    version: 1
    streams:
      narrow: {key: "{P}narrow"}
      wide: {key: "{P}wide"}
    groups:
      narrow:
        stream: narrow
        concurrency: 4
        routes:
          - call: {M}:handle
"""

WIDE = """
      wide:
        stream: wide
        concurrency: 40
        routes:
          - call: {M}:handle
"""


async def _all_at_once(
    client: Any, prefix: str, group: str, numbers: range, passed: list[Any]
) -> None:
    """Send one message per number to ``group``'s stream; wait until all passed the barrier."""
    key = f"{prefix}{group}"
    pipe = client.pipeline(transaction=False)
    for n in numbers:
        pipe.xadd(key, {"g": group, "n": str(n)})
    await pipe.execute()
    wanted = {(group, str(n)) for n in numbers}
    await wait_for(lambda: wanted <= set(passed), what=f"{group}: all handlers at once")
    await wait_for(lambda: none_pending(client, key, group), what=f"{group} acknowledged")


async def test_sync_calls_have_a_thread_for_every_handler(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """The call thread pool has a thread per handler of groups with sync calls (44 > 32)."""
    mod = write_module(tmp_path, BARRIER)
    config = make_project(tmp_path, NARROW + WIDE, url=redis_url, prefix=key_prefix, mod=mod)
    async with running(config) as runner:
        assert runner.executor.threads == 44
        passed = module(mod).passed
        await _all_at_once(redis_client, key_prefix, "wide", range(40), passed)
        await _all_at_once(redis_client, key_prefix, "narrow", range(4), passed)


async def test_reload_grows_the_call_thread_pool(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """A group with sync calls added by a reload gets threads for all its handlers."""
    mod = write_module(tmp_path, BARRIER)
    config = make_project(tmp_path, NARROW, url=redis_url, prefix=key_prefix, mod=mod)
    async with running(config) as runner:
        assert runner.executor.threads == 8
        passed = module(mod).passed
        await _all_at_once(redis_client, key_prefix, "narrow", range(4), passed)
        make_project(tmp_path, NARROW + WIDE, url=redis_url, prefix=key_prefix, mod=mod)
        assert (await runner.reload("test"))["outcome"] == "applied"
        assert runner.executor.threads == 44
        await _all_at_once(redis_client, key_prefix, "wide", range(40), passed)
        await _all_at_once(redis_client, key_prefix, "narrow", range(4, 8), passed)
