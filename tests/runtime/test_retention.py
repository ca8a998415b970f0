"""Retention against a real server: capped streams lose no unread or pending work."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from projects import make_project, module, none_pending, running, wait_for, write_module

from cortex_flow.cli import cli
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import resolve
from cortex_flow.ops.status import collect
from cortex_flow.runtime.metrics import build_registry, render

RETENTION = ", retention_interval: 100ms, duty_lease: 1s"

SLOW = """
    import asyncio

    handled = []
    failed = set()

    async def handle(msg):
        await asyncio.sleep(float(msg.get("pause", "0")))
        if msg["n"] == "bad" and "bad" not in failed:
            failed.add("bad")
            raise RuntimeError("fails once")
        handled.append(msg["n"])
"""

FLOW = """
    version: 1
    streams:
      tasks:
        key: "{P}tasks"
        retention: {max_len: 100}
      dlq: {key: "{P}dlq"}
    groups:
      slow:
        stream: tasks
        concurrency: 1
        batch: 10
        dead_letter: dlq
        retry: {backoff: {initial: BACKOFF}}
        routes:
          - call: {M}:handle
"""


def _project(tmp_path: Path, redis_url: str, prefix: str, backoff: str = "1s") -> Path:
    mod = write_module(tmp_path, SLOW)
    flows = FLOW.replace("BACKOFF", backoff)
    return make_project(
        tmp_path, flows, url=redis_url, prefix=prefix, mod=mod, runner_extra=RETENTION
    )


def _handled(config: Path) -> list[str]:
    text = (config.parent / "flows" / "main.yaml").read_text()
    name = text.split("call: ")[1].split(":")[0]
    return list(module(name).handled)


async def _status(config: Path, client: Any) -> dict[str, Any]:
    project = load_project(config)
    return await collect(client, resolve(project.topology, project.config.runner.name))


async def test_a_burst_on_a_capped_stream_is_delivered_whole_then_trimmed_to_the_cap(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str, caplog: Any
) -> None:
    """5x the cap published at once to a slow group: every entry is handled, status and
    the metric name the group holding the key meanwhile, and the key shrinks to its cap."""
    config = _project(tmp_path, redis_url, key_prefix)
    tasks = f"{key_prefix}tasks"
    caplog.set_level(logging.WARNING, "cortex_flow.retention")
    async with running(config) as runner:
        pipe = redis_client.pipeline(transaction=False)
        for n in range(500):
            pipe.xadd(tasks, {"n": str(n), "pause": "0.002"})
        await pipe.execute()

        held = await wait_for(
            lambda: _held_rows(config, redis_client), timeout=20, what="the hold in status"
        )
        assert held[0]["group"] == "slow" and held[0]["key"] == tasks
        assert held[0]["held"] > 0 and held[0]["max_len"] == 100
        data = await _status(config, redis_client)
        assert any(p.startswith("group slow holds") for p in data["problems"])
        await runner.refresh()
        assert ("tasks", tasks, "slow") in runner.stats.retention_held
        registry, _ = build_registry(runner.stats)
        metrics = render(registry).decode()
        labels = f'{{group="slow",key="{tasks}",stream="tasks"}}'
        assert f"cortex_flow_retention_held{labels}" in metrics
        assert f"cortex_flow_retention_held_seconds{labels}" in metrics
        assert "retention: group slow holds" in caplog.text

        await wait_for(lambda: len(_handled(config)) == 500, timeout=60, what="all handled")
        await wait_for(lambda: none_pending(redis_client, tasks, "slow"), what="all acked")
        await wait_for(lambda: _length_is(redis_client, tasks, 100), what="trimmed to the cap")
        assert sorted(map(int, _handled(config))) == list(range(500))
        assert await _held_rows(config, redis_client) == []
        assert runner.stats.trimmed[tasks] == 400


async def _held_rows(config: Path, client: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = (await _status(config, client))["retention"]
    return rows


async def _held(config: Path, client: Any, count: int) -> list[dict[str, Any]]:
    rows = await _held_rows(config, client)
    return rows if rows and rows[0]["held"] == count else []


async def _length_is(client: Any, key: str, length: int) -> bool:
    return bool(await client.xlen(key) == length)


async def test_a_failed_entry_waiting_for_its_retry_is_never_trimmed(
    tmp_path: Path, redis_url: str, redis_client: Any, key_prefix: str
) -> None:
    """An entry pending for its backoff stays in the stream while newer ones are
    handled and trimmed past the cap; its retry then succeeds."""
    config = _project(tmp_path, redis_url, key_prefix, backoff="3s")
    tasks = f"{key_prefix}tasks"
    async with running(config):
        bad = await redis_client.xadd(tasks, {"n": "bad"})
        for n in range(300):
            await redis_client.xadd(tasks, {"n": str(n)})
        await wait_for(lambda: len(_handled(config)) == 300, timeout=30, what="the good ones")
        # passes ran while the bad one waits: only the entries up to it could go
        first = (await redis_client.xrange(tasks, count=1))[0][0]
        assert first == bad
        await wait_for(lambda: "bad" in _handled(config), timeout=30, what="the retry")
        await wait_for(lambda: _length_is(redis_client, tasks, 100), what="trimmed to the cap")
    assert await redis_client.xlen(f"{key_prefix}dlq") == 0
    assert sorted(_handled(config)) == sorted([*map(str, range(300)), "bad"])


async def test_an_undeclared_group_holds_retention_shows_as_stale_and_is_pruned(
    tmp_path: Path,
    redis_url: str,
    redis_client: Any,
    key_prefix: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A group no flow declares keeps its unread entries from being trimmed; status and
    plan list it as stale with what it holds; prune asks, refuses a declared group, and
    destroys it with --yes, after which the key is trimmed to its cap."""
    config = _project(tmp_path, redis_url, key_prefix)
    tasks = f"{key_prefix}tasks"
    await redis_client.xgroup_create(tasks, "forgotten", id="0", mkstream=True)
    async with running(config) as runner:
        for n in range(150):
            await redis_client.xadd(tasks, {"n": str(n)})
        await wait_for(lambda: len(_handled(config)) == 150, timeout=30, what="all handled")
        await wait_for(lambda: none_pending(redis_client, tasks, "slow"), what="all acked")
        rows = await wait_for(lambda: _held(config, redis_client, 50), what="the hold of 50")
        assert rows[0]["group"] == "forgotten"
        assert await redis_client.xlen(tasks) == 150

        data = await _status(config, redis_client)
        [stale] = data["stale_groups"]
        assert (stale["name"], stale["key"], stale["holds"]) == ("forgotten", tasks, 150)
        assert any("`cortex-flow prune forgotten`" in p for p in data["problems"])
        assert await asyncio.to_thread(cli, "plan", "--config", str(config)) in (0, 3)
        assert "stale on" in capsys.readouterr().out
        assert await asyncio.to_thread(cli, "status", "--config", str(config)) == 0
        shown = capsys.readouterr().out
        assert "Held above retention" in shown and "Stale groups" in shown
        assert await asyncio.to_thread(cli, "status", "--config", str(config), "--json") == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["stale_groups"][0]["name"] == "forgotten"
        assert doc["retention"][0]["group"] == "forgotten"
        duties = {d["name"]: d["holder"] for d in doc["duties"]}
        assert duties == dict.fromkeys(
            ("agents", "retention", "consumers", "delayed"), runner.instance
        )
        assert f"retention {runner.instance}" in shown

        assert await asyncio.to_thread(cli, "prune", "slow", "--config", str(config), "--yes") == 1
        assert "is declared" in capsys.readouterr().err
        monkeypatch.setattr("builtins.input", lambda: "n")
        assert await asyncio.to_thread(cli, "prune", "forgotten", "--config", str(config)) == 1
        assert "nothing destroyed" in capsys.readouterr().out
        assert (
            await asyncio.to_thread(cli, "prune", "forgotten", "--config", str(config), "--yes")
            == 0
        )
        assert "destroyed group forgotten on 1 key(s)" in capsys.readouterr().out
        await wait_for(lambda: _length_is(redis_client, tasks, 100), what="trimmed to the cap")
        assert (await _status(config, redis_client))["stale_groups"] == []
    assert await asyncio.to_thread(cli, "prune", "forgotten", "--config", str(config), "--yes") == 1
    assert "no group forgotten" in capsys.readouterr().err
