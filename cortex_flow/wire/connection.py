"""Redis clients from URLs, waiting for a server, and the backoff used to reconnect.

Supported URLs::

    redis://[user[:password]@]host[:port][/db]        plain TCP (``?cluster=true`` for a cluster)
    rediss://...                                      TLS
    unix://[user[:password]@]/path/to/redis.sock[?db=N]
    redis+sentinel://[user[:password]@]host:port[,host:port...]/service_name[/db]
    redis+cluster://[user[:password]@]host:port[,host:port...]

``rediss+sentinel://`` and ``rediss+cluster://`` are the TLS variants. Credentials missing
from the URL come from ``CORTEX_REDIS_USERNAME`` / ``CORTEX_REDIS_PASSWORD``, so a password
never has to be written in a file. Query parameters redis-py understands (``socket_timeout``,
``ssl_ca_certs``...) are passed through and win over the defaults below.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.crc import key_slot
from redis.exceptions import AuthorizationError

from cortex_flow.errors import ConnectionFailed
from cortex_flow.flow.urls import describe_url, url_hosts, validate_url
from cortex_flow.wire.codec import ERRORS
from cortex_flow.wire.redis_errors import explain, redis_user

__all__ = [
    "ENCODING_ERRORS",
    "SOCKET_TIMEOUT",
    "Backoff",
    "RedisClient",
    "describe_client",
    "describe_error",
    "describe_url",
    "is_cluster",
    "redis_from_url",
    "same_slot",
    "validate_url",
    "wait_for_redis",
]

RedisClient = aioredis.Redis | RedisCluster

CLIENT_NAME = "cortex-flow"
# Blocking reads (XREADGROUP BLOCK) must block for less than this, or the socket times out.
SOCKET_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
# A pooled connection idle this long is PINGed before reuse, so a dead one is replaced.
HEALTH_CHECK_INTERVAL = 30
# Each idle group waits in a blocking read on a connection of its own: a pool of
# redis-py's default 100 would refuse the 101st group ("Too many connections").
# Redis's own maxclients default is 10,000.
MAX_CONNECTIONS = 10_000
LOG_EVERY = 5.0
_TRUE = ("1", "true", "yes", "on")
# One entry that is not UTF-8 must not make a whole read (a batch, a group) fail:
# surrogateescape, counted (see cortex_flow.wire.codec).
ENCODING_ERRORS = ERRORS


def redis_from_url(
    url: str,
    *,
    decode: bool = True,
    socket_timeout: float | None = SOCKET_TIMEOUT,
    client_name: str = CLIENT_NAME,
) -> RedisClient:
    """Build a client for ``url`` without connecting. Raises ``ValueError`` for a bad URL.

    ``socket_timeout`` bounds every reply: blocking reads must block for less than it.
    Replies decode with surrogateescape: bytes that are not UTF-8 arrive as lone
    surrogates instead of raising in the middle of a read, and a str holding them is
    written back as the very same bytes (see :func:`cortex_flow.wire.codec.check_text`).
    """
    validate_url(url)
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = dict(pairs)
    options: dict[str, Any] = {
        "decode_responses": decode,
        "encoding_errors": ENCODING_ERRORS,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "client_name": client_name,
        "max_connections": MAX_CONNECTIONS,
    }
    # Each credential the URL lacks comes from the environment: secrets stay out of files.
    for field in ("username", "password"):
        value = os.environ.get(f"CORTEX_REDIS_{field.upper()}")
        if value and getattr(parts, field) is None and field not in query:
            options[field] = value
    scheme = parts.scheme
    if scheme.endswith("+sentinel"):
        return _sentinel_client(url, query, options)
    if scheme.endswith("+cluster") or query.pop("cluster", "false").lower() in _TRUE:
        return _cluster_client(url, query, options)
    if any(key == "cluster" for key, _ in pairs):  # ours, not redis-py's: drop it
        url = urlunsplit(parts._replace(query=urlencode([p for p in pairs if p[0] != "cluster"])))
    return aioredis.Redis.from_url(url, **options)


def _typed(query: dict[str, str], url: str) -> dict[str, Any]:
    """Query parameters cast the way redis-py casts them for redis:// URLs."""
    typed: dict[str, Any] = {}
    for key, value in query.items():
        try:
            typed[key] = URL_QUERY_ARGUMENT_PARSERS.get(key, str)(value)
        except (TypeError, ValueError):
            raise ValueError(f"{describe_url(url)!r}: {key}={value!r} is not valid") from None
    return typed


def _url_credentials(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    found = {"username": parts.username, "password": parts.password}
    return {k: unquote(v) for k, v in found.items() if v}


def _sentinel_client(url: str, query: dict[str, str], options: dict[str, Any]) -> aioredis.Redis:
    """A client for the master of the service; Sentinel re-resolves it after a failover."""
    service, _, db = urlsplit(url).path.strip("/").partition("/")
    sentinel_options: dict[str, Any] = {
        "username": query.pop("sentinel_username", None),
        "password": query.pop("sentinel_password", None),
    }
    options = options | _url_credentials(url) | _typed(query, url)
    if db:
        options["db"] = int(db)
    if url.startswith("rediss"):
        options["ssl"] = True
    sentinel_options = {k: v for k, v in sentinel_options.items() if v}
    for key in ("socket_timeout", "socket_connect_timeout", "socket_keepalive", "ssl"):
        if key in options:
            sentinel_options[key] = options[key]
    sentinel_options["client_name"] = options["client_name"]
    nodes = url_hosts(url, 26379)
    sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_options, **options)
    client: aioredis.Redis = sentinel.master_for(unquote(service))
    return client


def _cluster_client(url: str, query: dict[str, str], options: dict[str, Any]) -> RedisCluster:
    """A cluster client; it discovers the other nodes from the first one that answers."""
    options = options | _url_credentials(url) | _typed(query, url)
    options.setdefault("ssl", url.startswith("rediss"))
    nodes = [ClusterNode(host, port) for host, port in url_hosts(url, 6379)]
    try:
        return RedisCluster(startup_nodes=nodes, **options)
    except TypeError as exc:  # an option in the query that RedisCluster does not take
        raise ValueError(f"{describe_url(url)!r}: {exc}") from None


def describe_client(client: RedisClient) -> str:
    """Where ``client`` connects, as a URL without credentials."""
    if isinstance(client, RedisCluster):
        nodes = client.nodes_manager.startup_nodes.values()
        tls = client.nodes_manager.connection_kwargs.get("connection_class") is SSLConnection
        return (
            ("rediss" if tls else "redis")
            + "+cluster://"
            + ",".join(_address(n.host, n.port) for n in nodes)
        )
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        sentinels = pool.sentinel_manager.sentinels
        found = [s.connection_pool.connection_kwargs for s in sentinels]
        hosts = ",".join(_address(k["host"], k["port"]) for k in found)
        return f"redis+sentinel://{hosts}/{pool.service_name}"
    kwargs = pool.connection_kwargs
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{kwargs['path']}" + (f"?db={db}" if db else "")
    scheme = "rediss" if issubclass(pool.connection_class, SSLConnection) else "redis"
    address = _address(kwargs.get("host", "localhost"), kwargs.get("port", 6379))
    return f"{scheme}://{address}" + (f"/{db}" if db else "")


def _address(host: str, port: object) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Backoff:
    """Exponential delays with ±``jitter`` randomisation, capped at ``maximum`` seconds."""

    def __init__(
        self,
        initial: float = 0.1,
        maximum: float = 5.0,
        *,
        factor: float = 2.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {initial}, {maximum}")
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next attempt; each call grows it until ``maximum``."""
        base = min(self.maximum, self.initial * self.factor**self.attempts)
        self.attempts += 1
        spread = base * self.jitter
        return min(self.maximum, max(0.0, base + self._rng.uniform(-spread, spread)))

    def reset(self) -> None:
        """Start again from ``initial`` (call after a success)."""
        self.attempts = 0


def describe_error(exc: BaseException) -> str:
    """A short cause: ``Connection refused`` rather than redis-py's full sentence.

    An ACL, credential, TLS or DNS failure is said with its fix (see ``redis_errors``).
    """
    explained = explain(exc)
    if explained is not None:
        return explained.text
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    return str(exc).rstrip(".") or type(exc).__name__


async def wait_for_redis(
    client: RedisClient,
    *,
    timeout: float | None,
    log: logging.Logger,
    initial: float = 0.1,
    maximum: float = 5.0,
) -> None:
    """PING until the server answers, backing off between attempts.

    Logs at most one warning per few seconds. Raises ``ConnectionFailed`` when ``timeout``
    seconds pass (``None`` waits forever) or at once when the server rejects the credentials,
    since retrying cannot fix that.
    """
    where = describe_client(client)
    backoff = Backoff(initial, maximum)
    deadline = None if timeout is None else time.monotonic() + timeout
    last_log: float | None = None
    reason = ""
    error: BaseException | None = None
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        try:
            async with asyncio.timeout(remaining):
                await client.ping()
        except AuthorizationError as exc:
            raise ConnectionFailed(
                f"Redis at {where} refused the connection: {describe_error(exc)}. Check the "
                "credentials in the URL or in CORTEX_REDIS_USERNAME / CORTEX_REDIS_PASSWORD."
            ) from None
        except TimeoutError as exc:  # our deadline cut the attempt short: keep the real cause
            reason, error = reason or "timed out", error or exc
        except Exception as exc:  # every other failure is worth another try
            explained = explain(exc, user=redis_user(client), command="PING", where=where)
            if explained is not None and (explained.fatal_at_start or explained.kind == "acl"):
                # the credentials or the certificate must change: waiting cannot help
                raise ConnectionFailed(explained.about(where)) from None
            reason, error = describe_error(exc), exc
        else:
            if backoff.attempts:
                log.info("redis at %s is reachable", where)
            return
        now = time.monotonic()
        delay = backoff.next_delay()
        if deadline is not None:
            if now >= deadline:
                raise ConnectionFailed(
                    f"Redis at {where} was not reachable within {timeout:g}s ({reason}). "
                    "Check that the server is running and that redis.url in config.yaml "
                    "(or CORTEX_REDIS_URL) points at it."
                ) from error
            delay = min(delay, deadline - now)
        if last_log is None or now - last_log >= LOG_EVERY:
            log.warning(
                "redis at %s is not reachable (%s); retrying in %.1fs", where, reason, delay
            )
            last_log = now
        await asyncio.sleep(delay)


def is_cluster(client: object) -> bool:
    """True for a Redis Cluster client, whose multi-key commands must stay in one slot."""
    return isinstance(client, RedisCluster)


def same_slot(*keys: str) -> bool:
    """True when all ``keys`` hash to one cluster slot (``{tag}`` hash tags respected)."""
    return len({key_slot(key.encode()) for key in keys}) <= 1
