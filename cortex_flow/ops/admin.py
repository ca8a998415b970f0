"""Asking a running runner through its admin endpoint (``/readyz``, ``/topology``).

Used by ``status`` and ``plan``. The token (``admin.token`` in config.yaml, which comes from
the environment, else ``CORTEX_ADMIN_TOKEN``) goes with every request as
``Authorization: Bearer ...``, for endpoints that require one.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

from cortex_flow.flow.config import AdminSettings
from cortex_flow.wire.connection import describe_error

__all__ = ["ADMIN_TIMEOUT", "TOKEN_ENV", "AdminReply", "admin_get", "admin_url"]

ADMIN_TIMEOUT = 1.0
TOKEN_ENV = "CORTEX_ADMIN_TOKEN"

# (status, body) when the runner answered, or (None, reason) when it did not
AdminReply = tuple[int | None, Any]


def admin_url(admin: AdminSettings, path: str) -> str | None:
    """``http://host:port/path`` of the runner's admin endpoint; None when it is off."""
    where = admin.host_port
    if where is None:
        return None
    host, port = where
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


async def admin_get(
    admin: AdminSettings, path: str, *, timeout: float = ADMIN_TIMEOUT
) -> AdminReply:
    """GET ``path`` from the runner: ``(status, JSON body)``, or ``(None, why not)``."""
    url = admin_url(admin, path)
    if url is None:
        return None, "admin endpoint is off"
    token = admin.token or os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.get(url, headers=headers) as reply,
        ):
            return reply.status, await reply.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return None, describe_error(exc)
