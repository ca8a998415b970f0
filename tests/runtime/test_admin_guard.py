"""Who may call the admin endpoint: Host allow-list, cross-site refusals, the token.

Over real HTTP on loopback; each refused request is checked to have done nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cortex_flow.flow.config import AdminSettings
from cortex_flow.ops.status import probe_admin
from cortex_flow.runtime.admin import AdminServer
from cortex_flow.runtime.stats import RunnerStats

LOG = logging.getLogger("cortex_flow.test_admin_guard")
TOKEN = "s3cret-admin-token-0123456789"


class Guarded:
    """An admin server whose reload counts its calls, and a session to call it."""

    def __init__(self, server: AdminServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.port = server.bound_port
        self.base = f"http://127.0.0.1:{self.port}"
        self.reloads = 0

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, data: Any = None
    ) -> tuple[int, Any]:
        async with self.session.request(
            method, self.base + path, headers=headers, data=data
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()


Start = Callable[..., Awaitable[Guarded]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    servers: list[AdminServer] = []
    session = aiohttp.ClientSession()

    async def start(**options: Any) -> Guarded:
        guarded: Guarded | None = None

        async def reload() -> dict[str, Any]:
            assert guarded is not None
            guarded.reloads += 1
            return {"outcome": "unchanged"}

        server = AdminServer(
            "127.0.0.1",
            0,
            stats=RunnerStats(runner="r1", connected=True, provisioned=True),
            ready=lambda: (True, {}),
            reload=reload,
            refresh=None,
            log=LOG,
            **options,
        )
        await server.start()
        servers.append(server)
        guarded = Guarded(server, session)
        return guarded

    try:
        yield start
    finally:
        await session.close()
        for server in servers:
            await server.stop()


LOOPBACK = "localhost, 127.0.0.1, ::1"  # sorted: "127.0.0.1", "::1", "localhost"


@pytest.mark.parametrize("path", ["/metrics", "/readyz", "/healthz", "/"])
async def test_foreign_host_header_is_refused(start: Start, path: str) -> None:
    """A request whose Host names another site (DNS rebinding) answers 403 on every path."""
    admin = await start()
    status, body = await admin.call("GET", path, {"Host": f"rebind.example:{admin.port}"})
    assert status == 403
    assert body == {
        "error": f"Host 'rebind.example:{admin.port}' is not allowed",
        "fix": "use one of 127.0.0.1, ::1, localhost or list the name in admin.allowed_hosts",
        "path": path,
    }


async def test_post_reload_from_a_foreign_host_does_not_reload(start: Start) -> None:
    """POST /reload with a foreign Host is refused before reload() runs."""
    admin = await start()
    status, _ = await admin.call("POST", "/reload", {"Host": "rebind.example"})
    assert (status, admin.reloads) == (403, 0)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST", "[::1]"])
async def test_loopback_host_names_are_answered(start: Start, host: str) -> None:
    """localhost, 127.0.0.1 and [::1], with or without the port, are answered."""
    admin = await start()
    assert (await admin.call("GET", "/healthz", {"Host": host}))[0] == 200
    assert (await admin.call("GET", "/healthz", {"Host": f"{host}:{admin.port}"}))[0] == 200


async def test_allowed_hosts_replace_the_default(start: Start) -> None:
    """Given hosts are the only names answered; "*" answers any."""
    names = {"runner-1.internal"}
    admin = await start(hosts=lambda: names)
    assert (await admin.call("GET", "/healthz", {"Host": "runner-1.internal:9"}))[0] == 200
    assert (await admin.call("GET", "/healthz", {"Host": "127.0.0.1"}))[0] == 403
    names = {"*"}
    assert (await admin.call("GET", "/healthz", {"Host": "anything.example"}))[0] == 200


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"Sec-Fetch-Site": "cross-site"}, "cross-site request (Sec-Fetch-Site: cross-site)"),
        ({"Sec-Fetch-Site": "same-site"}, "cross-site request (Sec-Fetch-Site: same-site)"),
        ({"Origin": "https://evil.example"}, "cross-origin request (Origin: https://evil.example)"),
        ({"Origin": "null"}, "cross-origin request (Origin: null)"),
        (
            {"Content-Type": "application/x-www-form-urlencoded"},
            "a application/x-www-form-urlencoded body, as a cross-site form sends; "
            "send JSON or none",
        ),
        (
            {"Content-Type": "text/plain"},
            "a text/plain body, as a cross-site form sends; send JSON or none",
        ),
    ],
)
async def test_cross_site_post_is_refused(
    start: Start, headers: dict[str, str], error: str
) -> None:
    """A POST a web page on another site could send answers 403 and does not reload."""
    admin = await start()
    status, body = await admin.call("POST", "/reload", headers, data="x=1")
    assert (status, admin.reloads) == (403, 0)
    assert body == {
        "error": error,
        "fix": "send it from a program (curl, the cortex-flow command), not a web page",
        "path": "/reload",
    }


async def test_same_origin_and_plain_posts_reload(start: Start) -> None:
    """curl-style POSTs (no Origin, no body), same-origin ones and JSON bodies reload."""
    admin = await start()
    same = {"Origin": admin.base, "Sec-Fetch-Site": "same-origin"}
    assert (await admin.call("POST", "/reload"))[0] == 200
    assert (await admin.call("POST", "/reload", same))[0] == 200
    json_body = {"Content-Type": "application/json"}
    assert (await admin.call("POST", "/reload", json_body, data="{}"))[0] == 200
    assert admin.reloads == 3


async def test_token_guards_reload_but_not_probes(start: Start) -> None:
    """With a token, POST /reload needs Authorization: Bearer; probes and /metrics do not."""
    admin = await start(token=lambda: TOKEN)
    status, body = await admin.call("POST", "/reload")
    assert (status, admin.reloads) == (401, 0)
    assert body == {
        "error": "this endpoint needs the admin token",
        "fix": "send Authorization: Bearer $CORTEX_ADMIN_TOKEN (the value of admin.token)",
        "path": "/reload",
    }
    for wrong in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer "):
        status, body = await admin.call("POST", "/reload", {"Authorization": wrong})
        assert (status, body["error"], admin.reloads) == (401, "wrong token", 0), wrong
    ok = await admin.call("POST", "/reload", {"Authorization": f"Bearer {TOKEN}"})
    assert (ok[0], admin.reloads) == (200, 1)
    for path in ("/healthz", "/readyz", "/metrics", "/"):
        assert (await admin.call("GET", path))[0] == 200, path


async def test_refused_token_says_bearer_and_is_never_logged(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """A 401 carries WWW-Authenticate: Bearer; neither the token nor a wrong one is logged."""
    admin = await start(token=lambda: TOKEN)
    with caplog.at_level(logging.DEBUG):
        url = admin.base + "/reload"
        async with admin.session.post(url, headers={"Authorization": "Bearer guess"}) as reply:
            assert reply.headers["WWW-Authenticate"] == 'Bearer realm="cortex-flow"'
        await admin.call("POST", "/reload", {"Authorization": f"Bearer {TOKEN}"})
    assert "refused POST /reload from 127.0.0.1: wrong token" in caplog.text
    assert TOKEN not in caplog.text and "guess" not in caplog.text


async def test_a_new_endpoint_is_guarded_by_default(start: Start) -> None:
    """A route added to the app later (e.g. GET /plan) gets the Host and token checks."""
    admin = await start(token=lambda: TOKEN)

    async def plan(request: web.Request) -> web.Response:
        return web.json_response({"plan": []})

    app = admin.server.app()
    app.router.add_get("/plan", plan)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/plan"
    try:
        async with admin.session.get(base) as reply:
            assert reply.status == 401
        async with admin.session.get(base, headers={"Host": "rebind.example"}) as reply:
            assert reply.status == 403
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with admin.session.get(base, headers=bearer) as reply:
            assert (reply.status, await reply.json()) == (200, {"plan": []})
    finally:
        await runner.cleanup()


async def test_a_changed_token_applies_to_the_next_request(start: Start) -> None:
    """The token is read per request, so a reload that rotates it takes effect at once."""
    tokens = [TOKEN]
    admin = await start(token=lambda: tokens[-1])
    tokens.append("rotated-token-0123456789")
    old = await admin.call("POST", "/reload", {"Authorization": f"Bearer {TOKEN}"})
    new = await admin.call("POST", "/reload", {"Authorization": f"Bearer {tokens[-1]}"})
    assert (old[0], new[0], admin.reloads) == (401, 200, 1)


# --- cortex-flow status, the endpoint's own client -----------------------------------------


async def test_status_probe_sends_the_token() -> None:
    """`cortex-flow status` sends admin.token as a Bearer token with its /readyz probe."""
    seen: list[str | None] = []

    async def readyz(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"status": "ready", "detail": {"reload": None}})

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        settings = AdminSettings(listen=f"127.0.0.1:{port}", token=TOKEN)
        assert (await probe_admin(settings))["ready"] is True
        assert (await probe_admin(AdminSettings(listen=f"127.0.0.1:{port}")))["ready"] is True
    finally:
        await runner.cleanup()
    assert seen == [f"Bearer {TOKEN}", None]


async def test_status_says_why_the_runner_refused_it(start: Start) -> None:
    """A runner that refuses status's probe (Host not allowed) is reported with the fix."""
    admin = await start(hosts=lambda: {"runner-1.internal"})
    found = await probe_admin(AdminSettings(listen=f"127.0.0.1:{admin.port}"))
    assert found == {
        "admin": f"127.0.0.1:{admin.port}",
        "reachable": False,
        "reason": f"it refused the request: Host '127.0.0.1:{admin.port}' is not allowed; "
        "use one of runner-1.internal or list the name in admin.allowed_hosts",
    }


def test_hosts_answered_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback names always; then admin.allowed_hosts, else the host of admin.listen."""
    loopback = {"localhost", "127.0.0.1", "::1"}
    assert AdminSettings().hosts == loopback
    public: dict[str, Any] = {"allow_public": True, "token": TOKEN}
    assert AdminSettings(listen="10.0.0.5:8477", **public).hosts == loopback | {"10.0.0.5"}
    listed = AdminSettings(listen="0.0.0.0:8477", allowed_hosts=["Runner-1.Internal"], **public)
    assert listed.hosts == loopback | {"runner-1.internal"}
