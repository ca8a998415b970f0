"""The README quickstart on the repository's own flows, end to end on a private server.

The runner runs in-process (``FlowHarness``, real handlers from ``agents_example``) on a
server of the test's own, so the flows' fixed ``cortex:`` keys clash with nobody; the
quickstart's ``cortex-flow`` lines are read from the README and run as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import re
import shlex
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis_servers import PrivateRedis

from cortex_flow.cli import cli
from cortex_flow.testing import FlowHarness

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config.yaml"


def quickstart_commands() -> list[list[str]]:
    """The ``cortex-flow ...`` lines of the README's quickstart, as argument lists."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    lines = [shlex.split(line, comments=True) for b in blocks for line in b.splitlines()]
    return [words[1:] for words in lines if words and words[0] == "cortex-flow"]


async def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run one ``cortex-flow`` command (exit 0 expected); what it printed."""
    code = await asyncio.to_thread(cli, *args)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    return out


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
def repo(monkeypatch: pytest.MonkeyPatch, private_redis: PrivateRedis) -> str:
    """In the repository, CORTEX_REDIS_URL naming the test's server, no A2A bridge."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("CORTEX_REDIS_URL", private_redis.url)
    monkeypatch.delenv("CORTEX_A2A_URL", raising=False)
    return private_redis.url


async def test_the_readme_quickstart_ends_where_it_says(
    repo: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """harold handles the first send; the second (no such agent) is a dead letter with
    "no route matched"; status shows who reads each inbox; nothing calls an A2A server."""
    caplog.set_level(logging.INFO, logger="agents_example")
    commands = quickstart_commands()
    assert [c[:2] for c in commands] == [
        ["send", "tasks"],
        ["send", "tasks"],
        ["status"],
        ["dlq", "list"],
    ]
    async with FlowHarness(CONFIG, url=repo) as h:
        dlq = h.dead_letter_keys()
        assert dlq == ["cortex:tasks:dlq"]
        for args in commands[:2]:
            await run_cli(capsys, *args)

        async def both_done() -> bool:
            handled = any("harold got" in r.getMessage() for r in caplog.records)
            return handled and await h.client.xlen(dlq[0]) == 1

        await until(both_done, "harold's message handled and one dead letter")
        assert await h.settle()
        [(_, harold)] = await h.entries("inbox", agent="harold")
        assert harold == {"to": "harold", "text": "hello"}
        assert (await h.client.xpending("cortex:messages:harold", "harold"))["pending"] == 0
        [(_, dead)] = await h.dead_letters()
        assert {k: dead[k] for k in ("to", "text", "dlq_group", "dlq_error")} == {
            "to": "nobody",
            "text": "hello",
            "dlq_group": "agents",
            "dlq_error": "no route matched",
        }
        assert dead["dlq_stream"] == "cortex:tasks:normal"
        assert [c for c in h.calls if c.kind == "http"] == []  # no A2A bridge by default

        status = await run_cli(capsys, *commands[2])
        assert "cortex:tasks:dlq holds 1 dead letter(s)" in status
        for agent, read_by in [
            ("harold", "group harold"),
            ("planner", "client (group planner)"),
            ("worker", "group workers"),
        ]:
            assert re.search(rf"│ {agent} .*│ {re.escape(read_by)}\s*│", status), status
        listed = await run_cli(capsys, *commands[3])
        assert "no route matched" in listed and "agents" in listed
        data = json.loads(await run_cli(capsys, "status", "--json"))
        rows = {a["name"]: a for a in data["agents"]}
        assert rows["planner"]["read_by"] == ["client (group planner)"]
        assert not any("nothing reads" in p for p in data["problems"])


async def test_a_rejected_task_and_the_planner_process(
    repo: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """harold's handler rejects a message without text (dead letter with its reason);
    the planner agent process handles its inbox, and dead-letters a goal-less message
    after its 3 deliveries; the runner never reads planner's group."""
    caplog.set_level(logging.INFO, logger="agents_example")
    monkeypatch.syspath_prepend(str(REPO))
    planner = importlib.import_module("agents_example.planner")
    async with FlowHarness(CONFIG, url=repo) as h:
        agent = asyncio.create_task(planner.main(CONFIG))
        try:
            await run_cli(capsys, "send", "tasks", '{"to": "harold"}')
            await run_cli(capsys, "send", "inbox", '{"goal": "ship it"}', "--agent", "planner")
            await run_cli(capsys, "send", "inbox", '{"text": "no goal"}', "--agent", "planner")

            async def two_dead() -> bool:
                assert not agent.done(), agent
                return bool(await h.client.xlen("cortex:tasks:dlq") == 2)

            await until(two_dead, "two dead letters")
        finally:
            agent.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await agent
        dead = {f["dlq_group"]: f for _, f in await h.dead_letters()}
        assert {g: f["dlq_deliveries"] for g, f in dead.items()} == {"harold": "3", "planner": "3"}
        assert dead["harold"]["dlq_error"].endswith(
            "ValueError: message to harold has no text field"
        )
        assert dead["planner"]["dlq_error"] == "ValueError: message to planner has no goal field"
        assert dead["planner"]["text"] == "no goal"
        assert any("planner planned ship it" in r.getMessage() for r in caplog.records)
        consumers = await h.client.xinfo_consumers("cortex:messages:planner", "planner")
        assert [c["name"] for c in consumers] == ["planner"]  # the agent, not the runner
        assert (await h.client.xpending("cortex:messages:planner", "planner"))["pending"] == 0


async def test_the_a2a_bridge_is_opt_in(
    repo: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With CORTEX_A2A_URL set, what no other route takes is POSTed there, not dead-lettered."""
    monkeypatch.setenv("CORTEX_A2A_URL", "http://127.0.0.1:9/a2a")
    async with FlowHarness(CONFIG, url=repo) as h:
        await run_cli(capsys, "send", "tasks", '{"to": "nobody", "text": "hello"}')

        async def posted() -> bool:
            return any(c.kind == "http" for c in h.calls)

        await until(posted, "the A2A POST")
        assert await h.settle()
        [call] = h.calls
        assert (call.target, call.msg) == (
            "http://127.0.0.1:9/a2a",
            {"to": "nobody", "text": "hello"},
        )
        assert await h.dead_letters() == []
