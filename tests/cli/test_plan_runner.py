"""`cortex-flow plan` against a running runner (GET /topology), and keys that are not streams."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from projects import write_module, write_project
from redis_servers import free_port

from cortex_flow.cli import cli
from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.exposed import read_doc, redact, topology_doc
from cortex_flow.flow.loader import load_project
from cortex_flow.runtime.runner import Runner

FLOW = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      done: {key: "{P}done"}
      other: {key: "{P}other"}
    groups:
      workers:
        stream: tasks
        concurrency: 2
        routes:
          - name: forward
            to: done
      audit:
        stream: other
        routes:
          - call: {M}:handle
"""

HANDLERS = """
def handle(msg):
    pass
"""


def _config(url: str, port: int | str) -> str:
    listen = f"'127.0.0.1:{port}'" if port != "off" else "'off'"
    return (
        f"redis: {{url: '{url}'}}\n"
        "runner: {name: planner-runner}\n"
        "reload: {watch: false}\n"
        f"admin: {{listen: {listen}}}\n"
    )


def _project(tmp_path: Path, url: str, prefix: str, port: int | str) -> Path:
    mod = write_module(tmp_path, HANDLERS)
    return write_project(tmp_path, FLOW, config=_config(url, port), prefix=prefix, mod=mod)


async def test_plan_shows_what_a_reload_of_the_running_runner_would_do(
    tmp_path: Path, redis_url: str, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A changed concurrency and a re-targeted route, which Redis cannot show, are planned
    as the running runner's reload would apply them: a restart and a route swap."""
    port = free_port()
    config = _project(tmp_path, redis_url, key_prefix, port)
    runner = Runner(load_project(config), watcher=None, block=0.2)
    await runner.start()
    try:
        assert await asyncio.to_thread(cli, "plan", "--config", str(config)) == 0
        out = capsys.readouterr().out
        assert "what a reload of the running runner at http://127.0.0.1:" in out
        assert "No changes: the running runner already runs these flows." in out

        flows = tmp_path / "flows" / "main.yaml"
        text = flows.read_text().replace("concurrency: 2", "concurrency: 8")
        flows.write_text(text.replace("to: done", "to: other"))
        assert await asyncio.to_thread(cli, "plan", "--config", str(config)) == 3
        out = capsys.readouterr().out
        assert "  ~ group workers: concurrency 2 -> 8" in out
        assert "  ~ group workers: changed routes[0]: to done -> other" in out
        assert "a reload would restart workers" in out

        flows.write_text(text.replace("concurrency: 8", "concurrency: 2"))
        flows.write_text(flows.read_text().replace("to: done", "to: other"))
        assert (
            await asyncio.to_thread(cli, "plan", "--config", str(config), "--format", "json") == 3
        )
        doc = json.loads(capsys.readouterr().out)
        assert doc["compared_with"] == "runner"
        assert doc["reload"] == {
            "start": [],
            "restart": [],
            "stop": [],
            "swap_routes": ["workers"],
        }
    finally:
        await runner.stop(5)


def test_plan_says_it_compared_with_redis_alone_without_a_runner(
    tmp_path: Path, redis_url: str, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no runner answering, `plan` says so and compares with Redis alone."""
    config = _project(tmp_path, redis_url, key_prefix, free_port())
    assert cli("plan", "--config", str(config)) == 3
    captured = capsys.readouterr()
    assert "no running runner: compared with Redis alone" in captured.out
    assert "no runner answered at 127.0.0.1:" in captured.err


async def test_a_key_that_is_not_a_stream_is_a_problem_for_plan_and_run(
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
    redis_client: aioredis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A declared key holding a string: `plan` reports it (exit 1) and `run` refuses with
    one line naming the stream's declaration, before it creates any group."""
    config = _project(tmp_path, redis_url, key_prefix, "off")
    await redis_client.set(f"{key_prefix}other", "not a stream")
    flows = os.path.relpath(tmp_path / "flows" / "main.yaml")
    line = (
        f"{flows}:6:3: streams.other: key {key_prefix}other holds a string, not a "
        "stream; rename or delete that key in Redis, or change streams.other.key"
    )
    assert await asyncio.to_thread(cli, "plan", "--config", str(config)) == 1
    out = capsys.readouterr().out
    assert f"  x {line}" in out

    runner = Runner(load_project(config), admin=False, watcher=None, block=0.2)
    with pytest.raises(CortexFlowError) as caught:
        await runner.start()
    await runner.stop(1)
    assert str(caught.value) == line
    assert not await redis_client.exists(f"{key_prefix}tasks")  # no group was created


def test_topology_document_round_trips_and_hides_secrets(tmp_path: Path) -> None:
    """What GET /topology serves reads back to the same flows; secrets are digests."""
    config = write_project(
        tmp_path,
        """
        version: 1
        streams: {tasks: {key: "t:tasks"}}
        groups:
          g:
            stream: tasks
            routes:
              - http: {url: "http://127.0.0.1:1/x", headers: {Authorization: "Bearer s3cret"}}
        """,
        config="redis: {url: 'redis://:pw@127.0.0.1:6379/0'}\n",
    )
    project = load_project(config)
    doc = topology_doc(project.topology, project.config, "r1")
    text = json.dumps(doc)
    assert "s3cret" not in text and ":pw@" not in text
    name, topology, settings = read_doc(json.loads(text))
    assert name == "r1" and set(topology.groups) == {"g"}
    assert redact({"http": {"headers": {"X": "a"}}}) != redact({"http": {"headers": {"X": "b"}}})
    assert settings.redis.url.startswith("redis://:hidden-")
