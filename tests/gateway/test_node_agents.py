"""Agents written in Node (examples/node-agent/): one on Redis itself, one on the gateway."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis_servers import free_port

from cortex_flow.flow.loader import load_project
from cortex_flow.gateway import Gateway
from cortex_flow.wire.access import connect

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node-agent"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed on this machine")
WEBBY = "w" * 8 + "-webby-token-0123456789"

FLOWS = """\
version: 1
streams:
  inbox: {key: "{P}inbox:{{ agent }}"}
  heartbeats: {key: "{P}heartbeats"}
agents:
  harold: {inbox: {}}
  noder: {inbox: {}}
  webby: {token: "${WEBBY_TOKEN}", may_send: [inbox], inbox: {}}
heartbeats: {stream: heartbeats}
"""


@pytest.fixture(scope="module")
def installed() -> Path:
    """`npm ci` from the committed lock file (the npm registry must be reachable)."""
    npm = shutil.which("npm")
    assert npm is not None, "node is installed but npm is not"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    return EXAMPLE


async def _node(script: str, env: dict[str, str]) -> str:
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE, script, cwd=EXAMPLE, env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, out.decode()
    return out.decode()


async def _sent(redis: aioredis.Redis, key: str, count: int) -> list[str]:
    return [await redis.xadd(key, {"from": "harold", "text": f"hi {i}"}) for i in range(count)]


async def _replies(redis: aioredis.Redis, prefix: str, agent: str) -> dict[str, str]:
    return {
        f["reply_to"]: f["text"]
        for _, f in await redis.xrange(f"{prefix}inbox:harold")
        if f.get("from") == agent
    }


async def test_node_agent_on_redis(
    installed: Path, tmp_path: Path, redis_url: str, key_prefix: str, redis_client: aioredis.Redis
) -> None:
    """It reads its inbox with XREADGROUP, beats, replies to each sender and acks all."""
    ids = await _sent(redis_client, f"{key_prefix}inbox:noder", 5)
    out = await _node("redis-agent.mjs", {
        "REDIS_URL": redis_url, "AGENT": "noder", "INBOX_KEY": f"{key_prefix}inbox:noder",
        "INBOX_PREFIX": f"{key_prefix}inbox:", "HEARTBEATS_KEY": f"{key_prefix}heartbeats",
        "STOP_AFTER": "5",
    })  # fmt: skip
    assert "handled 5" in out
    replies = await _replies(redis_client, key_prefix, "noder")
    assert replies == {i: f"HI {n}" for n, i in enumerate(ids)}
    pending = await redis_client.xpending(f"{key_prefix}inbox:noder", "noder")
    assert pending["pending"] == 0
    beats = await redis_client.xrange(f"{key_prefix}heartbeats")
    assert {(f["agent"], f["kind"]) for _, f in beats} == {("noder", "agent")}


async def test_node_agent_on_the_gateway(
    installed: Path, tmp_path: Path, redis_url: str, key_prefix: str, redis_client: aioredis.Redis
) -> None:
    """Over the gateway's WebSocket it gets each message, replies by POST and acks it."""
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "main.yaml").write_text(FLOWS.replace("{P}", key_prefix))
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f'redis: {{url: "{redis_url}"}}\ngateway: {{listen: "127.0.0.1:{port}"}}\n')
    project = load_project(config, env={"WEBBY_TOKEN": WEBBY})
    ids = await _sent(redis_client, f"{key_prefix}inbox:webby", 7)
    async with Gateway(lambda: project, lambda: connect(redis_url)):
        out = await _node("gateway-agent.mjs", {
            "GATEWAY_URL": f"http://127.0.0.1:{port}", "AGENT": "webby", "TOKEN": WEBBY,
            "STOP_AFTER": "7",
        })  # fmt: skip
    assert "handled 7" in out
    replies = await _replies(redis_client, key_prefix, "webby")
    assert replies == {i: f"HI {n}" for n, i in enumerate(ids)}
    pending = await redis_client.xpending(f"{key_prefix}inbox:webby", "webby")
    assert pending["pending"] == 0
    beats = await redis_client.xrange(f"{key_prefix}heartbeats")
    assert {f["agent"] for _, f in beats} == {"webby"}
