"""Who may talk to the admin endpoint: the Host, cross-site and token checks.

One aiohttp middleware in front of every route, so an endpoint added later gets the same
checks without asking for them:

- every request: the ``Host:`` header names one of the allowed hosts (port ignored), so a
  page whose own name resolves to 127.0.0.1 (DNS rebinding) is refused;
- a request that may change something (any method but GET, HEAD, OPTIONS): refused when a
  browser says it comes from another site (``Sec-Fetch-Site``), from another origin
  (``Origin``), or carries a body a cross-site HTML form or a no-preflight ``fetch`` could
  send (``application/x-www-form-urlencoded``, ``multipart/form-data``, ``text/plain``);
  ``curl -X POST`` sends none of these;
- when a token is configured, every endpoint but the read-only ones in :data:`OPEN` takes
  ``Authorization: Bearer <token>``, compared in constant time. The token is never logged.
  A browser, which cannot send that header, signs in once at ``/ui/login`` and then carries
  the session cookie :data:`SESSION_COOKIE` (a keyed hash of the token, ``HttpOnly``,
  ``SameSite=Strict``), accepted in its place.

Refusals answer 403 (host, origin) or 401 (token) with a JSON body saying what to change.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Collection
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = ["OPEN", "SESSION_COOKIE", "guard", "refuse", "request_host", "session_value"]

# read-only endpoints that answer without the token: probes and scrapers rarely carry one;
# the dashboard's sign-in page and its static files (no data in either)
OPEN = frozenset(("/", "/healthz", "/readyz", "/metrics", "/ui/login"))
OPEN_PREFIX = "/ui/static/"
SESSION_COOKIE = "cortex_flow_session"

SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
# what a cross-site <form> or a no-preflight fetch() can send (CORS "simple" content types)
FORM_TYPES = frozenset(("application/x-www-form-urlencoded", "multipart/form-data", "text/plain"))
SAME_SITE = frozenset(("same-origin", "none"))  # "none": typed in, or a bookmark


def refuse(status: int, error: str, fix: str, request: web.Request) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="cortex-flow"'} if status == 401 else None
    return web.json_response(
        {"error": error, "fix": fix, "path": request.path}, status=status, headers=headers
    )


def session_value(token: str) -> str:
    """The dashboard's session cookie for ``token``: changing the token ends every session."""
    return hmac.new(token.encode(), b"cortex-flow dashboard session", hashlib.sha256).hexdigest()


def _token_ok(request: web.Request, expected: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        return True
    cookie = request.cookies.get(SESSION_COOKIE)
    return cookie is not None and hmac.compare_digest(cookie, session_value(expected))


def request_host(host: str) -> str:
    """``Host:`` without its port, lower case, IPv6 brackets removed."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def guard(
    hosts: Callable[[], Collection[str]],
    token: Callable[[], str | None],
    log: logging.Logger,
) -> Middleware:
    """The middleware; ``hosts`` and ``token`` are read per request (a reload may change them)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        allowed = hosts()
        host = request.headers.get("Host", "")
        if "*" not in allowed and request_host(host) not in allowed:
            log.warning(
                "admin endpoint: refused %s %s with Host %r from %s (not in admin.allowed_hosts)",
                request.method,
                request.path,
                host[:100],
                request.remote,
            )
            return refuse(
                403,
                f"Host {host!r} is not allowed",
                "use one of " + ", ".join(sorted(allowed)) + " or list the name in "
                "admin.allowed_hosts",
                request,
            )
        if request.method not in SAFE_METHODS:
            refused = _cross_site(request, host)
            if refused is not None:
                log.warning(
                    "admin endpoint: refused %s %s from %s: %s",
                    request.method,
                    request.path,
                    request.remote,
                    refused,
                )
                return refuse(
                    403,
                    refused,
                    "send it from a program (curl, the cortex-flow command), not a web page",
                    request,
                )
        expected = token()
        public = request.path in OPEN or request.path.startswith(OPEN_PREFIX)
        if expected is not None and not public:
            sent = request.headers.get("Authorization", "")
            if not _token_ok(request, expected):
                if request.method == "GET" and request.path == "/ui":
                    raise web.HTTPSeeOther("/ui/login")  # a person at a browser: sign in
                log.warning(
                    "admin endpoint: refused %s %s from %s: %s",
                    request.method,
                    request.path,
                    request.remote,
                    "wrong token" if sent else "no token",
                )
                return refuse(
                    401,
                    "wrong token" if sent else "this endpoint needs the admin token",
                    "send Authorization: Bearer $CORTEX_ADMIN_TOKEN (the value of admin.token)",
                    request,
                )
        return await handler(request)

    return check


def _cross_site(request: web.Request, host: str) -> str | None:
    """Why a state-changing request looks like it came from a web page elsewhere, or None."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in SAME_SITE:
        return f"cross-site request (Sec-Fetch-Site: {site[:40]})"
    origin = request.headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin)
        if origin == "null" or parts.netloc.lower() != host.strip().lower():
            return f"cross-origin request (Origin: {origin[:100]})"
    if "Content-Type" in request.headers and request.content_type in FORM_TYPES:
        return f"a {request.content_type} body, as a cross-site form sends; send JSON or none"
    return None
