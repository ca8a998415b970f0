"""The HTTP client ``http`` routes use: it never connects to a refused address.

A host name in a flow file is checked when the flows are validated, but what it resolves
to can change: the resolver here drops every address the policy refuses
(:mod:`cortex_flow.flow.outbound`), and a host that resolves only to refused addresses
fails the request before any connection is made.
"""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
from aiohttp.resolver import ThreadedResolver

from cortex_flow.flow.outbound import current_policy, refusal_hint

__all__ = ["GuardedResolver", "RefusedAddress", "refused_reason", "session"]


class RefusedAddress(OSError):
    """Every address a host resolved to is refused by the policy."""


class GuardedResolver(ThreadedResolver):
    """aiohttp's threaded resolver, without the addresses the policy refuses."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[Any]:
        results = await super().resolve(host, port, family)
        policy = current_policy()
        kept, reasons = [], []
        for result in results:
            reason = policy.refused_address(result["host"], host)
            if reason is None:
                kept.append(result)
            else:
                reasons.append(reason)
        if not kept:
            raise RefusedAddress(refusal_hint(reasons[0]) if reasons else f"{host}: no address")
        return kept


def session() -> aiohttp.ClientSession:
    """A client session whose connections go through :class:`GuardedResolver`."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=GuardedResolver()))


def refused_reason(exc: BaseException) -> str | None:
    """The policy's reason when ``exc`` is a request refused by the resolver."""
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, RefusedAddress):
        return str(exc.os_error)
    return None
