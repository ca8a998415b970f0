"""Listen addresses, ``Host:`` names and bearer tokens, as the admin endpoint and the
gateway take them in ``config.yaml`` (pure: no sockets)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from cortex_flow.flow.modelerrors import show

WILDCARDS = ("0.0.0.0", "::", "")
# the names a browser on this machine uses for a loopback listener (see admin.allowed_hosts)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MIN_TOKEN = 16

_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_name(host: str) -> str:
    """One entry of ``allowed_hosts``, lower case; ``ValueError`` naming the fix otherwise."""
    name = host.strip().lower().strip("[]")
    if name != "*" and not _HOST_NAME.fullmatch(name) and not is_ip(name):
        raise ValueError(
            f"{show(host)} is not a host name or address; list them without scheme or "
            'port, e.g. ["metrics.internal", "10.0.0.5"], or "*" for any'
        )
    return name


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def listen_value(value: Any, example: str) -> Any:
    """``host:port``, or None for ``off``/``false``/null; ``ValueError`` otherwise."""
    if value is False or value is None or (isinstance(value, str) and value.lower() == "off"):
        return None
    if isinstance(value, str):
        port = value.rpartition(":")[2]
        if port.isdigit() and int(port) <= 65535:
            return value
    raise ValueError(f'must be host:port (e.g. {example}) or "off" to disable, got {show(value)}')


def host_port(listen: str | None) -> tuple[str, int] | None:
    """``(host, port)`` of a ``listen`` value; an empty host is 127.0.0.1."""
    if listen is None:
        return None
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def answered_hosts(listen: str | None, allowed: list[str]) -> frozenset[str]:
    """The ``Host:`` names a listener answers: loopback names (a page elsewhere cannot send
    them), and ``allowed``, else the host of ``listen``."""
    where = host_port(listen)
    own = () if where is None or where[0] in WILDCARDS else (where[0].lower(),)
    return frozenset((*LOOPBACK_NAMES, *(allowed or own)))


def token_text(value: Any, variable: str) -> Any:
    """A token as YAML read it: one string (digits only come as a number)."""
    # never the value in the message: it is a secret
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is not None and not isinstance(value, str):
        raise ValueError(
            f'must be one string; quote it: token: "${{{variable}}}" (the value is '
            "not shown: it is a secret)"
        )
    return value


def valid_token(value: str | None) -> str | None:
    """None for an empty token (``${VAR:-}``); ``ValueError`` for a short one."""
    if not value:
        return None
    if len(value) < MIN_TOKEN or value != value.strip():
        # never the value itself: it is a secret
        raise ValueError(
            f"must be at least {MIN_TOKEN} characters without surrounding spaces, got "
            f"{len(value)}; generate one, e.g. `openssl rand -hex 32`"
        )
    return value
