"""A gateway on a real Redis, served in-process by aiohttp's test server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from projects import running

from cortex_flow.flow.loader import Project, load_project
from cortex_flow.gateway import Gateway
from cortex_flow.wire.access import connect

HAROLD = "h" * 8 + "-harold-token-0123456789"
MAUDE = "m" * 8 + "-maude-token-0123456789"

FLOWS = """\
version: 1
streams:
  tasks: {key: "{P}tasks:{{ priority }}", priorities: [high, normal, low]}
  inbox: {key: "{P}inbox:{{ agent }}"}
  notes: {key: "{P}notes", codec: json}
  heartbeats: {key: "{P}heartbeats"}
  dlq: {key: "{P}dlq"}
agents:
  harold:
    token: ${HAROLD_TOKEN}
    may_send: [tasks, inbox, notes]
    inbox:
      retry: {max_deliveries: 3, backoff: {initial: 10ms, max: 20ms}, claim_idle: 60s}
      dead_letter: dlq
  maude:
    token: ${MAUDE_TOKEN}
    may_send: [inbox]
    inbox: {dead_letter: dlq}
  scout: {}
heartbeats: {stream: heartbeats}
"""


@dataclass
class Served:
    http: TestClient  # type: ignore[type-arg]
    project: Project
    redis: aioredis.Redis
    prefix: str

    def auth(self, token: str = HAROLD) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


def write(tmp_path: Path, redis_url: str, prefix: str, gateway: str = "{}") -> Path:
    (tmp_path / "flows").mkdir(exist_ok=True)
    (tmp_path / "flows" / "main.yaml").write_text(FLOWS.replace("{P}", prefix))
    path = tmp_path / "config.yaml"
    path.write_text(f'redis: {{url: "{redis_url}"}}\ngateway: {gateway}\n')
    return path


@pytest.fixture
def project(
    tmp_path: Path, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Project:
    monkeypatch.setenv("HAROLD_TOKEN", HAROLD)
    monkeypatch.setenv("MAUDE_TOKEN", MAUDE)
    return load_project(write(tmp_path, redis_url, key_prefix, "{max_body: 65536, max_credit: 5}"))


@pytest.fixture
async def served(
    project: Project, redis_client: aioredis.Redis, key_prefix: str, redis_url: str
) -> AsyncIterator[Served]:
    gateway = Gateway(lambda: project, lambda: connect(redis_url))
    server = TestServer(gateway.app())
    client = TestClient(server)
    await client.start_server()
    try:
        yield Served(client, project, redis_client, key_prefix)
    finally:
        await client.close()
        await gateway.stop()


@asynccontextmanager
async def beside_runner(
    config: Path, redis_url: str, port: int | None = None
) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    """A gateway for ``config`` served in-process, with a runner answering its flows."""
    project = load_project(config)
    gateway = Gateway(lambda: project, lambda: connect(redis_url))
    async with running(config, grace=0.5):
        client = TestClient(TestServer(gateway.app(), host="127.0.0.1", port=port))
        await client.start_server()
        try:
            yield client
        finally:
            await client.close()
            await gateway.stop()
