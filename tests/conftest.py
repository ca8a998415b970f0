"""Shared fixtures. Keep each group in its own section."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from fakeredis.aioredis import FakeRedis
from projects import NewProject, make_project, write_module
from redis_servers import PrivateRedis, answers_ping

# --- Redis servers -----------------------------------------------------------------------

# A SIGTERM (e.g. `timeout`) ends pytest through SystemExit, so atexit handlers run and the
# private redis-servers it started are killed instead of outliving the run.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: $CORTEX_TEST_REDIS_URL, else the local one on 6379, else a private one."""
    configured = os.environ.get("CORTEX_TEST_REDIS_URL")
    if configured:
        yield configured
    elif answers_ping(SHARED_REDIS_URL, timeout=0.5):
        yield SHARED_REDIS_URL
    else:
        with PrivateRedis(tmp_path_factory.mktemp("session-redis")) as server:
            yield server.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own (free to stop, kill, restart), ended at teardown."""
    with PrivateRedis(tmp_path / "private-redis") as server:
        yield server


# --- Clients and keys --------------------------------------------------------------------


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client (decoded responses) to the session's real Redis."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def key_prefix(redis_url: str) -> AsyncIterator[str]:
    """A unique ``cftest:<hex>:`` prefix; every key under it is deleted at teardown."""
    prefix = f"cftest:{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = aioredis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


@pytest.fixture
def prefix(key_prefix: str) -> str:
    """``key_prefix``, under the shorter name some tests use."""
    return key_prefix


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A plain (non-async) client, decoded responses, to the session's real Redis."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


@pytest.fixture
async def fake_redis() -> AsyncIterator[FakeRedis]:
    """An in-memory fakeredis server (decoded responses) for fast unit tests."""
    client = FakeRedis(decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


# --- Projects ----------------------------------------------------------------------------


@pytest.fixture
def new_project(tmp_path: Path, redis_url: str, key_prefix: str) -> NewProject:
    """``new_project(flows, handlers="", **make_project_options)``: (config, module name).

    Writes ``handlers`` (if any) as a module and a project in ``tmp_path`` on the session's
    Redis, its keys under ``key_prefix`` (see ``projects.make_project``).
    """

    def write(flows: str, handlers: str = "", **options: Any) -> tuple[Path, str]:
        mod = write_module(tmp_path, handlers) if handlers else ""
        config = make_project(tmp_path, flows, url=redis_url, prefix=key_prefix, mod=mod, **options)
        return config, mod

    return write
