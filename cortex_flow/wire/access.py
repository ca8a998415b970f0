"""A connected client to a project's Redis, for the commands that read or write it.

``status``, ``dlq``, ``plan`` and ``send`` talk to a Redis that ``run`` provisions; none of
them starts a server. For ``redis.url: embedded`` they use the embedded server a runner
recorded in ``.cortex/embedded.json``, and say so when there is none.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from cortex_flow.errors import ConnectionFailed, CortexFlowError
from cortex_flow.flow.loader import Project
from cortex_flow.wire.connection import (
    SOCKET_TIMEOUT,
    RedisClient,
    describe_client,
    describe_error,
    describe_url,
    redis_from_url,
    wait_for_redis,
)
from cortex_flow.wire.embedded import EMBEDDED, EmbeddedRedis
from cortex_flow.wire.redis_errors import explain, redis_user

__all__ = ["EmbeddedNotRunning", "connect", "connect_project", "project_url"]

# Warnings of the PING retries go nowhere unless a caller passes its own logger.
_QUIET = logging.Logger("cortex_flow.wire.access", level=logging.CRITICAL)


class EmbeddedNotRunning(ConnectionFailed):
    """``redis.url`` is ``embedded`` and no embedded server is running for the project."""


def project_url(project: Project) -> str:
    """The URL of the project's Redis: ``redis.url``, or the running embedded server's.

    Never starts a server: raises :class:`EmbeddedNotRunning` when ``embedded`` has none.
    """
    configured = project.config.redis.url
    if configured.strip() != EMBEDDED:
        return configured
    running = EmbeddedRedis.find_running(project.base_dir)
    if running is None:
        raise EmbeddedNotRunning(
            f"redis.url is `embedded`, but no embedded Redis is running for "
            f"{project.base_dir} (none recorded alive in .cortex/embedded.json). Start the "
            "runner with `cortex-flow run`, or point redis.url (or CORTEX_REDIS_URL) at a "
            "server."
        )
    return running


async def connect(
    url: str,
    *,
    wait: float | None = None,
    socket_timeout: float | None = SOCKET_TIMEOUT,
    log: logging.Logger = _QUIET,
) -> RedisClient:
    """A client to ``url``, checked with a PING.

    ``wait`` None tries once and fails at once; a number of seconds retries with backoff
    for that long (see :func:`~cortex_flow.wire.connection.wait_for_redis`), logging to ``log``.
    Raises ``ConnectionFailed`` when Redis does not answer, ``CortexFlowError`` for a URL
    that cannot be used.
    """
    try:
        client = redis_from_url(url, socket_timeout=socket_timeout)
    except ValueError as exc:
        raise CortexFlowError(f"redis.url: {exc}") from None
    try:
        if wait is not None:
            await wait_for_redis(client, timeout=wait, log=log)
        else:
            try:
                await client.ping()
            except (RedisError, OSError) as exc:
                where = describe_client(client)  # scheme://host:port, no credentials or query
                explained = explain(exc, user=redis_user(client), command="PING", where=where)
                if explained is not None:  # no "is it running?": it answered, and refused
                    raise ConnectionFailed(explained.about(where)) from None
                if url.startswith("rediss") and _reset(exc):
                    # TLS 1.3: a server that wants a client certificate may close the
                    # connection before its alert is read, so the reset is all we see
                    raise ConnectionFailed(
                        f"TLS connection to Redis at {where} was reset during the handshake; "
                        "the server may want a client certificate: give it with "
                        "?ssl_certfile=/path/cert.pem&ssl_keyfile=/path/key.pem in redis.url"
                    ) from exc
                raise ConnectionFailed(
                    f"cannot reach Redis at {describe_url(url)} ({describe_error(exc)}). Check "
                    "that the server is running and that redis.url in config.yaml (or "
                    "CORTEX_REDIS_URL) points at it."
                ) from exc
    except BaseException:
        await client.aclose()
        raise
    return client


def _reset(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a connection reset by the server."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ConnectionResetError) or "reset by peer" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def connect_project(
    project: Project, *, wait: float | None = None, log: logging.Logger = _QUIET
) -> RedisClient:
    """A client to the project's Redis (:func:`project_url`), checked as :func:`connect` does."""
    url = await asyncio.to_thread(project_url, project)
    return await connect(url, wait=wait, log=log)
