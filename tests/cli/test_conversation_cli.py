"""``send --wait``/``--ttl``, ``task`` and ``cancel`` as a user runs them (issue 14)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from projects import NewProject, running

from cortex_flow.cli.main import cli

FLOWS = """
version: 1
streams:
  ask: {key: "{P}ask:{{ priority }}", priorities: [high, normal]}
  nobody: {key: "{P}nobody"}
  dlq: {key: "{P}dlq"}
groups:
  ask:
    stream: ask
    dead_letter: dlq
    retry: {max_deliveries: 1}
    routes:
      - when: "msg.op == 'fail'"
        call: {M}:fail
      - when: "msg.op == 'stream'"
        call: {M}:words
      - call: {M}:answer
"""

HANDLERS = """
async def answer(msg):
    return {"got": msg, "ok": True}

async def fail(msg):
    raise ValueError("broken")

async def words(msg):
    yield "one"
    yield {"two": 2}
"""


@pytest.fixture
def project(new_project: NewProject) -> Path:
    return new_project(FLOWS, HANDLERS)[0]


async def run(config: Path, *args: str) -> int:
    """``cortex-flow ARGS --config CONFIG`` in a thread (it runs its own event loop)."""
    return await asyncio.to_thread(cli, *args, "--config", str(config))


async def test_send_wait_prints_the_reply(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reply as JSON, exit 0; a dead-lettered request prints the reason, exit 1; a
    streaming handler's parts print one JSON line each."""
    async with running(project):
        assert await run(project, "send", "ask", '{"n": "1"}', "--priority", "high", "--wait") == 0
        assert json.loads(capsys.readouterr().out) == {"got": {"n": "1"}, "ok": True}
        assert await run(project, "send", "ask", '{"op": "fail"}', "--wait", "10") == 1
        assert "failed: request" in capsys.readouterr().err
        assert await run(project, "send", "ask", '{"op": "stream"}', "--wait", "10") == 0
        assert capsys.readouterr().out == '"one"\n{"two": 2}\n'


async def test_send_wait_times_out_with_its_own_exit_code(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No runner: exit 124 after the timeout; bad timeouts and streams are usage errors."""
    assert await run(project, "send", "ask", "{}", "--wait", "200ms") == 124
    assert "timed out: no reply to request" in capsys.readouterr().err
    assert await run(project, "send", "ask", "{}", "--wait", "0") == 2
    assert "--wait must be more than 0 seconds" in capsys.readouterr().err
    assert await run(project, "send", "ask", "{}", "--ttl", "soon") == 2
    assert await run(project, "send", "nobody", "{}", "--wait") == 1
    assert "no group reads" in capsys.readouterr().err


async def test_send_ttl_sets_a_deadline(
    project: Path, redis_client: Any, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ttl 30s writes cf_deadline 30 s ahead."""
    before = int(time.time() * 1000)
    assert await run(project, "send", "ask", '{"n": "2"}', "--ttl", "30s") == 0
    ((_, fields),) = await redis_client.xrange(f"{key_prefix}ask:normal")
    assert before + 30_000 <= int(fields["cf_deadline"]) <= int(time.time() * 1000) + 30_000


async def test_task_and_cancel_commands(
    project: Path, redis_client: Any, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """task shows submitted, then canceled after cancel; a second cancel changes nothing;
    an unknown entry is an error."""
    assert await run(project, "send", "ask", '{"n": "3"}', "--ttl", "1m") == 0
    entry_id = capsys.readouterr().out.split()[1]
    assert await run(project, "task", "ask", entry_id, "--format", "json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "submitted"
    assert await run(project, "cancel", "ask", entry_id) == 0
    assert capsys.readouterr().out.startswith(f"canceled {entry_id}")
    assert await run(project, "cancel", "ask", entry_id) == 0
    assert "already canceled; nothing changed" in capsys.readouterr().out
    assert await run(project, "task", "ask", entry_id) == 0
    assert f"{entry_id} on {key_prefix}ask:normal: canceled" in capsys.readouterr().out
    assert await run(project, "task", "ask", "1-1") == 1
    assert "no task 1-1" in capsys.readouterr().err
