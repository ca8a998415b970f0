"""Client construction from URLs, waiting for a server, backoff, and slot helpers."""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from fakeredis.aioredis import FakeRedis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis_servers import PrivateRedis, free_port

from cortex_flow.errors import ConnectionFailed
from cortex_flow.wire.connection import (
    Backoff,
    RedisClient,
    describe_client,
    describe_url,
    is_cluster,
    redis_from_url,
    same_slot,
    validate_url,
    wait_for_redis,
)

LOG = logging.getLogger("test.connection")


@pytest.fixture(autouse=True)
def _no_credentials_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORTEX_REDIS_USERNAME", raising=False)
    monkeypatch.delenv("CORTEX_REDIS_PASSWORD", raising=False)


def kwargs_of(client: RedisClient) -> dict[str, Any]:
    assert isinstance(client, aioredis.Redis)
    return dict(client.connection_pool.connection_kwargs)


# --- URL parsing -------------------------------------------------------------------------


def test_redis_url_sets_host_port_db_and_defaults() -> None:
    """redis:// gives a plain client with timeouts, health checks and the client name."""
    client = redis_from_url("redis://10.0.0.5:6380/2")
    assert type(client) is aioredis.Redis
    kwargs = kwargs_of(client)
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("10.0.0.5", 6380, 2)
    assert kwargs["decode_responses"] is True
    assert kwargs["client_name"] == "cortex-flow"
    assert kwargs["socket_timeout"] == 30.0
    assert kwargs["socket_connect_timeout"] == 5.0
    assert kwargs["health_check_interval"] == 30


def test_decode_false_keeps_bytes() -> None:
    """decode=False turns decode_responses off."""
    assert kwargs_of(redis_from_url("redis://h", decode=False))["decode_responses"] is False


def test_rediss_url_uses_tls() -> None:
    """rediss:// connects over TLS and passes ssl_* query options through."""
    client = redis_from_url("rediss://h:6380?ssl_cert_reqs=none")
    assert isinstance(client, aioredis.Redis)
    assert client.connection_pool.connection_class is SSLConnection
    assert kwargs_of(client)["ssl_cert_reqs"] == "none"


def test_unix_url_uses_the_socket_path() -> None:
    """unix:// connects through the socket path, with the db from the query."""
    client = redis_from_url("unix:///run/redis/redis.sock?db=3")
    assert isinstance(client, aioredis.Redis)
    assert client.connection_pool.connection_class is UnixDomainSocketConnection
    assert (kwargs_of(client)["path"], kwargs_of(client)["db"]) == ("/run/redis/redis.sock", 3)


def test_query_options_win_over_defaults() -> None:
    """A socket_timeout in the URL overrides the default."""
    client = redis_from_url("redis://h?socket_timeout=3")
    assert kwargs_of(client)["socket_timeout"] == 3.0


def test_sentinel_url_builds_a_master_client_without_connecting() -> None:
    """redis+sentinel:// lists every sentinel, names the service and the db, and holds auth."""
    url = "redis+sentinel://:secret@s1:26379,s2/mymaster/4?sentinel_password=sp"
    client = redis_from_url(url)
    assert isinstance(client, aioredis.Redis)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("s1", 26379), ("s2", 26379)]
    assert all(s["password"] == "sp" for s in sentinels)
    assert (kwargs_of(client)["password"], kwargs_of(client)["db"]) == ("secret", 4)
    assert describe_client(client) == "redis+sentinel://s1:26379,s2:26379/mymaster"


def test_cluster_url_builds_a_cluster_client_without_connecting() -> None:
    """redis+cluster:// gives a RedisCluster seeded with every listed node."""
    client = redis_from_url("redis+cluster://:pw@n1:7000,n2:7001")
    assert isinstance(client, RedisCluster)
    assert is_cluster(client)
    assert sorted(client.nodes_manager.startup_nodes) == ["n1:7000", "n2:7001"]
    assert client.nodes_manager.connection_kwargs["password"] == "pw"
    assert client.nodes_manager.connection_kwargs["client_name"] == "cortex-flow"


def test_cluster_query_flag_on_redis_url() -> None:
    """redis://...?cluster=true means a cluster; cluster=false is dropped, not sent to redis-py."""
    assert is_cluster(redis_from_url("redis://n1:7000?cluster=true"))
    plain = redis_from_url("redis://n1:7000?cluster=false&socket_timeout=2")
    assert not is_cluster(plain)
    assert "cluster" not in kwargs_of(plain)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h:6379", "is not a supported Redis URL"),
        ("redis+sentinel://s1:26379", "names no sentinel service"),
        ("redis://h:abc", "port 'abc' is not a number"),
        ("redis://:hunter2@", "names no host"),
    ],
)
def test_bad_urls_are_rejected_without_showing_the_password(url: str, message: str) -> None:
    """validate_url raises ValueError naming the problem, with the password masked."""
    with pytest.raises(ValueError, match=message) as caught:
        validate_url(url)
    assert "hunter2" not in str(caught.value)


# --- Credentials from the environment ----------------------------------------------------


def test_credentials_come_from_env_when_url_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """CORTEX_REDIS_USERNAME / CORTEX_REDIS_PASSWORD fill in what the URL leaves out."""
    monkeypatch.setenv("CORTEX_REDIS_USERNAME", "alice")
    monkeypatch.setenv("CORTEX_REDIS_PASSWORD", "from-env")
    kwargs = kwargs_of(redis_from_url("redis://h:6379"))
    assert (kwargs["username"], kwargs["password"]) == ("alice", "from-env")
    cluster = redis_from_url("redis+cluster://n1:7000")
    assert isinstance(cluster, RedisCluster)
    assert cluster.nodes_manager.connection_kwargs["password"] == "from-env"


def test_url_credentials_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A username or password written in the URL is used as is; env fills only the gaps."""
    monkeypatch.setenv("CORTEX_REDIS_USERNAME", "env-user")
    monkeypatch.setenv("CORTEX_REDIS_PASSWORD", "env-pass")
    kwargs = kwargs_of(redis_from_url("redis://bob:url-pass@h"))
    assert (kwargs["username"], kwargs["password"]) == ("bob", "url-pass")
    kwargs = kwargs_of(redis_from_url("redis://bob@h"))
    assert (kwargs["username"], kwargs["password"]) == ("bob", "env-pass")


async def test_env_password_authenticates_against_a_real_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server with requirepass accepts the password given only in CORTEX_REDIS_PASSWORD."""
    with PrivateRedis(tmp_path, args=("--requirepass", "s3cret")) as server:
        monkeypatch.setenv("CORTEX_REDIS_PASSWORD", "s3cret")
        client = redis_from_url(server.url)
        try:
            await wait_for_redis(client, timeout=10, log=LOG)
            assert await client.ping()
        finally:
            await client.aclose()


async def test_wrong_password_fails_at_once(tmp_path: Path) -> None:
    """Rejected credentials raise ConnectionFailed immediately instead of retrying forever."""
    with PrivateRedis(tmp_path, args=("--requirepass", "s3cret")) as server:
        client = redis_from_url(server.url.replace("//", "//:wrong@"))
        try:
            with pytest.raises(ConnectionFailed, match="refused the password of user default"):
                await wait_for_redis(client, timeout=None, log=LOG)
        finally:
            await client.aclose()


# --- Masking -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:p%40ss@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://:pw@h", "redis://:***@h"),
        ("rediss://h:6380?password=x&ssl_cert_reqs=none", "rediss://h:6380?password=***&ssl_cert_reqs=none"),
        ("redis+sentinel://:pw@s1,s2:26380/svc?sentinel_password=sp", "redis+sentinel://:***@s1,s2:26380/svc?sentinel_password=***"),
        ("unix:///tmp/r.sock?db=1", "unix:///tmp/r.sock?db=1"),
        ("redis://alice@h", "redis://alice@h"),
        ("embedded", "embedded"),
    ],
)  # fmt: skip
def test_describe_url_masks_passwords(url: str, shown: str) -> None:
    """describe_url hides every password and leaves the rest of the URL as written."""
    assert describe_url(url) == shown


# --- Waiting for a server ----------------------------------------------------------------


async def test_wait_for_redis_succeeds_once_a_late_server_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """wait_for_redis keeps retrying (and says so) until a server starting later answers."""
    server = PrivateRedis(tmp_path)
    starter = threading.Timer(0.5, server.start)
    starter.start()
    client = redis_from_url(server.url)
    try:
        with caplog.at_level(logging.WARNING, logger=LOG.name):
            await wait_for_redis(client, timeout=30, log=LOG, maximum=0.2)
        assert await client.ping()
        assert f"redis at redis://127.0.0.1:{server.port} is not reachable" in caplog.text
        assert "Connection refused" in caplog.text
    finally:
        starter.join()
        server.stop()
        await client.aclose()


async def test_wait_for_redis_times_out_with_connection_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Against a closed port it raises ConnectionFailed naming the address and the cause."""
    port = free_port()
    client = redis_from_url(f"redis://127.0.0.1:{port}")
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionFailed) as caught:
            await wait_for_redis(client, timeout=0.5, log=LOG)
    finally:
        await client.aclose()
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert f"Redis at redis://127.0.0.1:{port} was not reachable within 0.5s" in message
    assert "(Connection refused)" in message
    assert len([r for r in caplog.records if "is not reachable" in r.message]) == 1


# --- Backoff -----------------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_maximum() -> None:
    """Without jitter, delays double from initial and stop at maximum."""
    backoff = Backoff(0.1, 1.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1, 1])


def test_backoff_jitter_stays_within_bounds_and_reset_starts_over() -> None:
    """Jittered delays stay within ±20% (never above maximum); reset() returns to initial."""
    backoff = Backoff(1.0, 4.0, rng=random.Random(7))
    for expected in (1.0, 2.0, 4.0, 4.0):
        assert expected * 0.8 <= backoff.next_delay() <= min(expected * 1.2, 4.0)
    backoff.reset()
    assert 0.8 <= backoff.next_delay() <= 1.2


def test_backoff_rejects_nonsense_bounds() -> None:
    """initial must be positive and not above maximum."""
    with pytest.raises(ValueError, match="0 < initial <= maximum"):
        Backoff(2.0, 1.0)


# --- Slots -------------------------------------------------------------------------------


def test_same_slot_respects_hash_tags() -> None:
    """Keys sharing a {hash tag} share a slot; the reference keys without tags do not."""
    assert same_slot("{cortex}:tasks:high", "{cortex}:tasks:dlq", "{cortex}:messages:harold")
    assert not same_slot("cortex:tasks:high", "cortex:tasks:dlq")
    assert same_slot("cortex:tasks:high")
    assert same_slot()


def test_is_cluster_is_false_for_plain_clients() -> None:
    """Plain and sentinel clients are not cluster clients."""
    assert not is_cluster(redis_from_url("redis://h"))
    assert not is_cluster(redis_from_url("redis+sentinel://s1/svc"))


# --- Against real servers ----------------------------------------------------------------


async def test_client_from_url_talks_to_the_session_server(redis_url: str, key_prefix: str) -> None:
    """A client from redis_from_url names itself cortex-flow and decodes replies."""
    client = redis_from_url(redis_url)
    try:
        await wait_for_redis(client, timeout=5, log=LOG)
        await client.set(f"{key_prefix}k", "v")
        assert await client.get(f"{key_prefix}k") == "v"
        assert await client.client_getname() == "cortex-flow"
    finally:
        await client.aclose()


async def test_client_recovers_after_the_server_restarts(tmp_path: Path) -> None:
    """After a crash and restart, wait_for_redis reconnects and persisted data is back."""
    server = PrivateRedis(tmp_path, appendonly=True).start()
    client = redis_from_url(server.url)
    try:
        await client.set("cftest:restart", "kept")
        server.kill()
        with pytest.raises(ConnectionFailed):
            await wait_for_redis(client, timeout=0.3, log=LOG)
        server.start()
        await wait_for_redis(client, timeout=10, log=LOG)
        assert await client.get("cftest:restart") == "kept"
    finally:
        server.stop()
        await client.aclose()


async def test_client_reconnects_after_a_clean_restart(private_redis: PrivateRedis) -> None:
    """A restart on the same port is transparent once wait_for_redis returns."""
    client = redis_from_url(private_redis.url)
    try:
        assert await client.ping()
        private_redis.restart()
        await wait_for_redis(client, timeout=10, log=LOG)
        assert await client.ping()
    finally:
        await client.aclose()


async def test_wait_for_redis_accepts_fakeredis(fake_redis: FakeRedis) -> None:
    """Unit tests can pass a fakeredis client wherever a real one is waited for."""
    await wait_for_redis(fake_redis, timeout=1, log=LOG)
    assert not is_cluster(fake_redis)
