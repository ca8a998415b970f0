"""Redis URLs without Redis: which schemes cortex-flow takes, and how to show one safely.

Kept apart from :mod:`cortex_flow.wire.connection` so that validating ``config.yaml``
does not import redis-py (a large share of ``cortex-flow validate``'s start-up).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

_QUERY_PASSWORD = re.compile(r"([?&][^=&#]*password[^=&#]*=)[^&#]*")

_PLAIN = frozenset(("redis", "rediss", "unix"))
_SCHEMES = _PLAIN | {
    f"{tcp}+{kind}" for tcp in ("redis", "rediss") for kind in ("sentinel", "cluster")
}


def validate_url(url: str) -> str:
    """Return ``url`` unchanged if cortex-flow can connect with it, else raise ``ValueError``.

    Pure (no I/O), so config validation can call it; the message never shows the password.
    """
    parts = urlsplit(url)
    shown = describe_url(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"{shown!r} is not a supported Redis URL; use redis://host:port, rediss://, "
            "unix:///path, redis+sentinel://host:port/service or redis+cluster://host:port"
        )
    if parts.scheme.endswith("+sentinel") and not parts.path.strip("/"):
        raise ValueError(f"{shown!r} names no sentinel service; add it: .../service_name")
    if parts.scheme == "unix" and "cluster=" in parts.query:
        raise ValueError(f"{shown!r}: a Redis Cluster cannot be reached over a unix socket")
    if parts.scheme != "unix" and not parts.netloc.rpartition("@")[2]:
        raise ValueError(f"{shown!r} names no host")
    url_hosts(url, 6379)
    _database(parts.scheme, parts.path, parts.query, shown)
    return url


def _database(scheme: str, path: str, query: str, shown: str) -> None:
    """The database number, where a URL gives one, is a number (redis-py reads junk as 0)."""
    if scheme.endswith("+cluster"):
        dbs = []  # a cluster has database 0 only; redis-py refuses the rest itself
    elif scheme.endswith("+sentinel"):
        dbs = path.strip("/").split("/")[1:]  # /service[/db]
    elif scheme == "unix":
        dbs = []  # the path is the socket's
    else:
        dbs = [path.strip("/")] if path.strip("/") else []
    dbs += [unquote(v) for k, _, v in (p.partition("=") for p in query.split("&")) if k == "db"]
    for db in dbs:
        if not db.isascii() or not db.isdigit():
            raise ValueError(
                f"{shown!r}: database {db!r} is not a number (redis-py would silently use 0); "
                "write the number after the host, e.g. redis://host:6379/0, or leave it out"
            )


def _host_port(host: str, url: str, default: int = 6379) -> tuple[str, int]:
    host = unquote(host)
    name, sep, port = host.rpartition(":")
    if not sep or name.endswith(":") or (host.startswith("[") and not name.endswith("]")):
        name, port = host, ""  # no port, or a bare IPv6 address
    try:
        number = int(port) if port else default
    except ValueError:
        raise ValueError(f"{describe_url(url)!r}: port {port!r} is not a number") from None
    return name.strip("[]"), number


def url_hosts(url: str, default: int) -> list[tuple[str, int]]:
    """Every ``(host, port)`` of a URL, comma-separated hosts included (Sentinel, Cluster)."""
    # urlsplit cannot parse a comma-separated host list (its .port raises), so split by hand.
    hosts = urlsplit(url).netloc.rpartition("@")[2]
    return [_host_port(host, url, default) for host in hosts.split(",")]


def describe_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.partition(":")[0] + ":***@" + hosts
    tail = _QUERY_PASSWORD.sub(r"\1***", tail)
    return f"{scheme}://{netloc}{tail}"


def targets_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``?cluster=true``)."""
    parts = urlsplit(url)
    if parts.scheme.endswith("+cluster"):
        return True
    query = dict(q.split("=", 1) for q in parts.query.split("&") if "=" in q)
    return query.get("cluster", "").lower() in ("1", "true", "yes", "on")
