"""``cortex_flow.testing.FlowHarness`` on fakeredis, a given server, and a private one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from projects import write_module, write_project

from cortex_flow import FlowHarness

FLOWS = """\
version: 1
streams:
  tasks: {key: "{P}t:{{ priority }}", priorities: [high, normal, low]}
  inbox: {key: "{P}m:{{ agent }}"}
  dlq: {key: "{P}dlq"}
  plain: {key: "{P}plain"}
agents:
  alice: {}
groups:
  router:
    stream: tasks
    dead_letter: dlq
    retry: {max_deliveries: 3, backoff: {initial: 30s, max: 5m}}
    routes:
      - {when: "msg.to in agents", to: inbox, vars: {agent: "{{ msg.to }}"}}
      - {when: "msg.kind == 'job'", call: "{M}:work"}
      - {http: {url: "http://127.0.0.1:9/hook"}}
  alice:
    stream: inbox
    vars: {agent: alice}
    routes:
      - call: "{M}:work"
  keeper:
    stream: plain
    retry: {max_deliveries: 2}
    routes:
      - call: "{M}:work"
"""

HANDLERS = """\
SEEN = []

async def work(msg):
    SEEN.append(dict(msg))
    if msg.get("bad"):
        raise ValueError("bad job")
"""


def make(tmp_path: Path, prefix: str = "") -> Path:
    """A project with a handler module of a unique name; returns its config path."""
    mod = write_module(tmp_path, HANDLERS)
    return write_project(tmp_path, FLOWS, config='admin: {listen: "off"}\n', prefix=prefix, mod=mod)


def targets(h: FlowHarness) -> list[str]:
    return [c.target.rpartition(":")[2] if c.kind == "call" else c.target for c in h.calls]


async def test_fake_routes_direct_message_to_inbox_and_its_handler(tmp_path: Path) -> None:
    """On fakeredis, a direct message lands on the inbox and reaches the inbox's handler."""
    async with FlowHarness(make(tmp_path), fake=True) as h:
        await h.send("tasks", {"to": "alice", "text": "hi"}, priority="high")
        [(_, fields)] = await h.wait_for_entries("inbox", 1, agent="alice")
        assert fields == {"to": "alice", "text": "hi"}
        await h.wait_idle()
        assert [(c.kind, c.msg) for c in h.calls] == [("call", {"to": "alice", "text": "hi"})]
        assert await h.dead_letters() == []


async def test_fake_serves_several_priority_keys_without_lua(tmp_path: Path) -> None:
    """A multi-key group works on fakeredis (the Lua fetch falls back to plain reads)."""
    async with FlowHarness(make(tmp_path), fake=True) as h:
        for priority in ("low", "normal", "high"):
            await h.send("tasks", {"to": "alice", "p": priority}, priority=priority)
        entries = await h.wait_for_entries("inbox", 3, agent="alice")
        assert sorted(f["p"] for _, f in entries) == ["high", "low", "normal"]
        await h.wait_idle()


async def test_fake_dead_letters_fast_despite_long_backoff(tmp_path: Path) -> None:
    """fast_retries turns a 30s backoff into 10ms: three failures reach the DLQ at once."""
    async with FlowHarness(make(tmp_path), fake=True) as h:
        entry_id = await h.send("tasks", {"kind": "job", "bad": "1"})
        await h.wait_idle(timeout=5.0)
        [(_, dead)] = await h.dead_letters()
        assert dead["dlq_id"] == entry_id and dead["dlq_deliveries"] == "3"
        assert "ValueError: bad job" in dead["dlq_error"]
        assert targets(h).count("work") == 3


async def test_handlers_and_http_are_stubbed(tmp_path: Path) -> None:
    """handlers= replaces call targets (ok, fail, a callable); http routes answer ok."""
    got: list[Any] = []
    config = make(tmp_path)
    mod = next(p.stem for p in tmp_path.glob("handlers_*.py"))
    handlers = {f"{mod}:work": got.append}
    async with FlowHarness(config, fake=True, handlers=handlers) as h:
        await h.send("tasks", {"kind": "job", "bad": "1"})
        await h.send("tasks", {"kind": "chat"})
        await h.wait_idle()
        assert got == [{"kind": "job", "bad": "1"}]
        assert ("http", "http://127.0.0.1:9/hook") in [(c.kind, c.target) for c in h.calls]
    async with FlowHarness(config, fake=True, handlers={f"{mod}:work": "fail"}) as h:
        await h.send("tasks", {"kind": "job"})
        await h.wait_idle()
        [(_, dead)] = await h.dead_letters()
        assert "HandlerFailed: stubbed failure" in dead["dlq_error"]
    async with FlowHarness(config, fake=True, http="fail") as h:
        await h.send("tasks", {"kind": "chat"})
        await h.wait_idle()
        [(_, dead)] = await h.dead_letters()
        assert "HTTP 503" in dead["dlq_error"]


async def test_wait_helpers_time_out_with_a_reason(tmp_path: Path) -> None:
    """wait_for_entries and wait_idle raise TimeoutError saying what is missing or stuck."""
    async with FlowHarness(make(tmp_path), fake=True) as h:
        with pytest.raises(TimeoutError, match=r"m:alice holds 0 entries after 0.1s"):
            await h.wait_for_entries("inbox", 1, timeout=0.1, agent="alice")
        await h.send("plain", {"bad": "1"})  # keeper has no dead_letter: stays pending
        assert await h.settle(timeout=5.0)
        assert (await h.backlog())[("keeper", "plain")] == (1, 0)
        with pytest.raises(TimeoutError, match=r"group keeper on plain: 1 pending"):
            await h.wait_idle(timeout=0.2)


async def test_real_server_url(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    """With url=, the runner uses that server (the Lua priority fetch included)."""
    async with FlowHarness(make(tmp_path, key_prefix), url=redis_url) as h:
        for priority in ("low", "high"):
            await h.send("tasks", {"to": "alice", "p": priority}, priority=priority)
        entries = await h.wait_for_entries("inbox", 2, agent="alice")
        assert {f["p"] for _, f in entries} == {"low", "high"}
        assert h.key("inbox", agent="alice") == f"{key_prefix}m:alice"
        await h.wait_idle()
        groups = await h.client.xinfo_groups(f"{key_prefix}t:high")
        assert [(g["name"], g["pending"]) for g in groups] == [("router", 0)]
        consumers = await h.client.xinfo_consumers(f"{key_prefix}t:high", "router")
        assert [c["name"] for c in consumers] == ["test"]


async def test_private_server_by_default(tmp_path: Path) -> None:
    """Without url or fake, the harness starts and stops a redis-server of its own."""
    async with FlowHarness(make(tmp_path), runner_name="mine") as h:
        info = await h.client.info("server")
        assert str(info["redis_version"]).startswith(("6.", "7.", "8."))
        await h.send("tasks", {"to": "alice"})
        await h.wait_for_entries("inbox", 1, agent="alice")
        await h.wait_idle()
    assert h._server is None


PARTITIONED = """\
version: 1
streams:
  chats:
    key: "{P}chats:{{ partition }}"
    partitions: 4
    partition_key: "{{ msg.conversation }}"
  replies:
    key: "{P}replies:{{ partition }}"
    partitions: 2
groups:
  answer:
    stream: chats
    routes:
      - to: replies
"""


def entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


async def test_the_harness_reads_a_partitioned_stream_as_one(tmp_path: Path) -> None:
    """send picks the partition as producers do; entries and wait_for_entries read every
    partition of a stream, in ID order; a partition can be named too."""
    config = write_project(tmp_path, PARTITIONED, config='admin: {listen: "off"}\n', prefix="h:")
    async with FlowHarness(config, fake=True) as h:
        for n in range(8):
            await h.send("chats", {"conversation": f"c{n % 4}", "n": str(n)})
        replies = await h.wait_for_entries("replies", 8)
        assert sorted(int(f["n"]) for _, f in replies) == list(range(8))
        chats = await h.entries("chats")
        assert [i for i, _ in chats] == sorted((i for i, _ in chats), key=entry_order)
        assert sorted(int(f["n"]) for _, f in chats) == list(range(8))
        from cortex_flow.flow.slots import partition_of

        one = await h.entries("chats", partition=f"{{p{partition_of('c0', 4)}}}")
        assert {f["conversation"] for _, f in one} >= {"c0"} and len(one) < 8


async def test_a2a_routes_are_stubbed_too(tmp_path: Path) -> None:
    """An a2a route under the harness: recorded with the message it sent, answered by a
    completed task (ok), or failing the message (fail); no network either way."""
    mod = write_module(tmp_path, HANDLERS)
    flows = FLOWS.replace(
        '{http: {url: "http://127.0.0.1:9/hook"}}', '{a2a: {url: "http://127.0.0.1:9/a2a/x"}}'
    )
    config = write_project(tmp_path, flows, config='admin: {listen: "off"}\n', mod=mod)
    async with FlowHarness(config, fake=True) as h:
        await h.send("tasks", {"kind": "chat"})
        await h.wait_idle()
        assert [(c.kind, c.target, c.msg) for c in h.calls] == [
            ("http", "http://127.0.0.1:9/a2a/x", {"kind": "chat"})
        ]
        assert await h.dead_letters() == []
    async with FlowHarness(config, fake=True, http="fail") as h:
        await h.send("tasks", {"kind": "chat"})
        await h.wait_idle()
        [(_, dead)] = await h.dead_letters()
        assert "HTTP 503 from A2A agent" in dead["dlq_error"]
