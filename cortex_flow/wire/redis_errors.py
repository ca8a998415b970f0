"""Redis errors that retrying soon will not fix, each said in one line with what to change.

An ACL that refuses a command or a key, credentials the server refuses, a TLS certificate
that does not verify, a host name that does not resolve: redis-py reports them as a
``NoPermissionError``, an ``AuthenticationError`` or a ``ConnectionError`` wrapping an
``ssl`` or ``socket.gaierror`` exception, whose own words ("Operation not permitted",
"Unknown error -2") hide the cause. :func:`explain` turns them into a sentence naming
the command and its ACL categories, the certificate problem or the host, and the fix.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

__all__ = ["ACL_CATEGORIES", "Explained", "explain", "redis_user"]

# The ACL categories of the commands cortex-flow sends (from COMMAND INFO, Redis 7.0).
ACL_CATEGORIES = {
    "xreadgroup": "@write @stream @slow @blocking",
    "xread": "@read @stream @slow @blocking",
    "xrange": "@read @stream @slow",
    "xrevrange": "@read @stream @slow",
    "xadd": "@write @stream @fast",
    "xack": "@write @stream @fast",
    "xclaim": "@write @stream @fast",
    "xautoclaim": "@write @stream @fast",
    "xpending": "@read @stream @slow",
    "xlen": "@read @stream @fast",
    "xdel": "@write @stream @fast",
    "xinfo|groups": "@read @stream @slow",
    "xinfo|stream": "@read @stream @slow",
    "xinfo|consumers": "@read @stream @slow",
    "xgroup|create": "@write @stream @slow",
    "xgroup|createconsumer": "@write @stream @slow",
    "xgroup|delconsumer": "@write @stream @slow",
    "type": "@keyspace @read @fast",
    "evalsha": "@slow @scripting",
    "eval": "@slow @scripting",
    "script|load": "@slow @scripting",
    "ping": "@fast @connection",
    "client|setname": "@slow @connection",
    "hello": "@fast @connection",
    "info": "@slow @dangerous",
}

_COMMAND = re.compile(r"permissions to run the '([^']+)' command")
_PIPELINE = re.compile(r"Command # \d+ \((\S+)")
_ADDRESS = re.compile(r"connecting to (\S+?)\.?(?: |$)")
_NO_PASSWORD = ("noauth", "authentication required", "hello must be called")
_CA_FIX = (
    "give the CA that signed it with ?ssl_ca_certs=/path/to/ca.pem in redis.url "
    "(ssl_cert_reqs=none turns the check off: for tests only)"
)

Kind = Literal["acl", "auth", "tls", "dns"]


@dataclass(frozen=True)
class Explained:
    """What went wrong, in one line. ``kind``: ``acl``, ``auth``, ``tls`` or ``dns``."""

    kind: Kind
    text: str

    @property
    def fatal_at_start(self) -> bool:
        """Waiting cannot help a start: the credentials or the certificate must change.

        A name that does not resolve may yet (a DNS record being created), and an ACL
        refusal concerns some commands only.
        """
        return self.kind in ("auth", "tls")

    def about(self, where: str) -> str:
        """The text, naming the server ``where`` when the text does not already."""
        return self.text if self.kind != "acl" else f"Redis at {where}: {self.text}"

    def __str__(self) -> str:
        return self.text


def redis_user(client: Any) -> str:
    """The ACL user ``client`` authenticates as (``default`` when it gives none)."""
    kwargs: dict[str, Any] = {}
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        kwargs = pool.connection_kwargs
    elif (nodes := getattr(client, "nodes_manager", None)) is not None:  # a cluster
        kwargs = nodes.connection_kwargs
    return str(kwargs.get("username") or "default")


def explain(
    exc: BaseException,
    *,
    user: str | None = None,
    command: str | None = None,
    keys: Sequence[str] = (),
    where: str | None = None,
) -> Explained | None:
    """One line for ``exc`` when it is an ACL, credential, TLS or DNS failure; else None.

    ``user`` is the ACL user (see :func:`redis_user`; None: not known). ``command`` is
    what was sent (e.g. ``XREADGROUP``), used when the server does not name it (a refused
    key); ``keys`` the keys it touched; ``where`` the server, for errors whose message
    does not name it (a refused password). The text never holds a password.
    """
    address = _address(exc)  # host:port from redis-py's words, when it gives them
    for seen in _chain(exc):
        if isinstance(seen, NoPermissionError) or _starts(seen, "noperm"):
            return Explained("acl", _acl(str(seen), user, command, keys))
        if isinstance(seen, AuthenticationError) or _starts(seen, "wrongpass", "noauth"):
            return Explained("auth", _auth(str(seen), user, where or address))
        if isinstance(seen, ssl.SSLCertVerificationError):
            return Explained("tls", _certificate(seen, address or where or ""))
        if isinstance(seen, ssl.SSLError):
            return Explained("tls", _handshake(seen, address or where or ""))
        if isinstance(seen, socket.gaierror):
            return Explained("dns", _unresolved(seen, address))
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    for _ in range(10):  # a cycle of causes is possible; ten is deep enough
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _starts(exc: BaseException, *words: str) -> bool:
    return isinstance(exc, ResponseError) and str(exc).lower().startswith(words)


def _acl(text: str, known: str | None, command: str | None, keys: Sequence[str]) -> str:
    user, who = (known, f"Redis user {known}") if known else ("<user>", "the Redis user")
    named = _COMMAND.search(text)
    in_pipeline = _PIPELINE.search(text)
    sent = (named.group(1) if named else None) or (in_pipeline.group(1) if in_pipeline else command)
    shown = sent.upper() if sent else ""
    if named:
        categories = ACL_CATEGORIES.get(named.group(1).lower())
        also = f" (ACL categories {categories})" if categories else ""
        family = " or +@stream" if categories and "@stream" in categories else ""
        return (
            f"{who} may not run {shown}{also}; grant it with "
            f"ACL SETUSER {user} +{named.group(1).lower()}{family}"
        )
    if "key" in text.lower():
        if keys:
            shown_keys = ", ".join(keys[:3]) + (
                f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            )
            which = f"the key {keys[0]}" if len(keys) == 1 else f"one of the keys {shown_keys}"
            grant = " ".join(f"~{k}" for k in keys[:3])
            by = f" ({shown})" if shown else ""
            them = "it" if len(keys) == 1 else "them"
            return (
                f"{who} may not access {which}{by}; grant {them} with ACL SETUSER {user} "
                f"{grant} (or a ~pattern that covers {them})"
            )
        of = f" of {shown}" if shown else ""
        return (
            f"{who} may not access one of the keys{of}; grant them with "
            f"ACL SETUSER {user} ~<pattern>"
        )
    what = shown or "a command"
    return f"{who} may not run {what} ({text.rstrip('.')}); check ACL GETUSER {user}"


def _auth(text: str, known: str | None, where: str) -> str:
    of = f" of user {known}" if known else ""
    at = f" at {where}" if where else ""
    lowered = text.lower()
    if any(word in lowered for word in _NO_PASSWORD):
        return (
            f"Redis{at} requires a password and none was given; set CORTEX_REDIS_PASSWORD "
            "(and CORTEX_REDIS_USERNAME for an ACL user) or put them in redis.url"
        )
    return (
        f"Redis{at} refused the password{of} (wrong password, or the user is "
        "disabled); fix the credentials in redis.url or CORTEX_REDIS_USERNAME / "
        "CORTEX_REDIS_PASSWORD"
    )


def _certificate(exc: ssl.SSLCertVerificationError, where: str) -> str:
    problem = (exc.verify_message or exc.reason or "verification failed").rstrip(".")
    at = f" of Redis at {where}" if where else " of Redis"
    if "mismatch" in problem.lower():
        fix = (
            "connect with a name the certificate was issued for, or reissue it with this "
            "name in its subjectAltName"
        )
    elif "expired" in problem.lower() or "not yet valid" in problem.lower():
        fix = "renew the server's certificate (or check this machine's clock)"
    else:
        fix = _CA_FIX
    return f"TLS: the certificate{at} does not verify: {problem}; {fix}"


def _handshake(exc: ssl.SSLError, where: str) -> str:
    reason = str(exc.reason or exc).lower().replace("_", " ")
    at = f" with Redis at {where}" if where else " with Redis"
    if "wrong version number" in reason or "record layer failure" in reason:
        fix = "the server does not speak TLS on this port: use redis://, or the server's tls-port"
    elif "certificate required" in reason or "handshake failure" in reason:
        fix = (
            "the server wants a client certificate: give it with "
            "?ssl_certfile=/path/cert.pem&ssl_keyfile=/path/key.pem in redis.url"
        )
    elif "unknown ca" in reason or "bad certificate" in reason:
        fix = "the server does not trust this client's certificate: use one its CA signed"
    else:
        fix = "check the TLS settings of redis.url against the server's"
    return f"TLS handshake{at} failed ({reason}); {fix}"


def _unresolved(exc: socket.gaierror, where: str) -> str:
    host = where.rpartition(":")[0].strip("[]") if where.count(":") == 1 else where
    name = f"host name {host}" if host else "the Redis host name"
    cause = exc.strerror or "no such host"
    return (
        f"{name} does not resolve ({cause}); check the host in redis.url "
        "(or CORTEX_REDIS_URL) and this machine's DNS"
    )


def _address(exc: BaseException) -> str:
    """``host:port`` from redis-py's "Error N connecting to host:port." message."""
    found = _ADDRESS.search(str(exc))
    return found.group(1) if found else ""
