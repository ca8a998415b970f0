"""Hostile flow files and messages against a real Redis: a template bomb, URL injection, a
host resolving to a metadata address and dangerous call targets fail what they touch (or
refuse to start), and every good message is delivered, counted by id."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from projects import NewProject, entries, equals, none_pending, running, wait_for

from cortex_flow.errors import ValidationFailed
from cortex_flow.flow.limits import DEFAULT_LIMITS, set_limits
from cortex_flow.flow.outbound import OutboundPolicy, set_policy

BOMB = (
    "{% if msg.kind == 'bomb' %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{{ j }}{% endfor %}{% endfor %}{% else %}{{ msg.n }}{% endif %}"
)


def forty(client: Any, key: str) -> Callable[[], Awaitable[bool]]:
    return lambda: equals(client.xlen(key), 40)


async def test_a_template_bomb_fails_its_message_and_every_good_one_is_delivered(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """A nested loop over range(100000) in a set template dead-letters that message with the
    bound it hit; 40 good messages in its group and 40 in another group are delivered."""
    config, _ = new_project(
        f"""
        version: 1
        streams:
          a: {{key: "{{P}}a"}}
          b: {{key: "{{P}}b"}}
          out_a: {{key: "{{P}}out_a"}}
          out_b: {{key: "{{P}}out_b"}}
          dlq: {{key: "{{P}}dlq"}}
        groups:
          bombed:
            stream: a
            dead_letter: dlq
            routes:
              - to: out_a
                set: {{n: "{BOMB}"}}
          calm:
            stream: b
            dead_letter: dlq
            routes:
              - to: out_b
                set: {{n: "{{{{ msg.n }}}}"}}
        """
    )
    async with running(config):
        bomb = await redis_client.xadd(f"{key_prefix}a", {"kind": "bomb", "n": "x"})
        for n in range(40):
            await redis_client.xadd(f"{key_prefix}a", {"kind": "good", "n": str(n)})
            await redis_client.xadd(f"{key_prefix}b", {"kind": "good", "n": str(n)})
        for key in (f"{key_prefix}out_a", f"{key_prefix}out_b"):
            await wait_for(forty(redis_client, key), timeout=30, what=f"40 entries in {key}")
        await wait_for(lambda: redis_client.xlen(f"{key_prefix}dlq"), what="the bomb dead-lettered")
        await wait_for(lambda: none_pending(redis_client, f"{key_prefix}a", "bombed"))
        await wait_for(lambda: none_pending(redis_client, f"{key_prefix}b", "calm"))
    for out in ("out_a", "out_b"):
        delivered = [f["n"] for _, f in await entries(redis_client, f"{key_prefix}{out}")]
        assert sorted(delivered, key=int) == [str(n) for n in range(40)]  # none lost or twice
    [(_, dead)] = await entries(redis_client, f"{key_prefix}dlq")
    assert dead["dlq_id"] == bomb
    assert dead["dlq_error"].startswith("routes[0]: set.n: template exceeded its ")
    assert "templates." in dead["dlq_error"]  # names the knob to raise


@pytest.fixture(autouse=True)
def default_settings() -> Iterator[None]:
    """The runner sets process-wide template bounds and outbound policy: restore them."""
    yield
    set_limits(DEFAULT_LIMITS)
    set_policy(OutboundPolicy())


async def test_the_configured_template_bounds_apply_at_run(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """``templates.max_steps`` in config.yaml is the bound the runner renders under."""
    config, _ = new_project(
        """
        version: 1
        streams:
          in: {key: "{P}in"}
          out: {key: "{P}out"}
          dlq: {key: "{P}dlq"}
        groups:
          g:
            stream: in
            dead_letter: dlq
            routes:
              - to: out
                set: {dots: "{% for i in range(msg.n | int) %}.{% endfor %}"}
        """
    )
    config.write_text(config.read_text() + "templates: {max_steps: 100}\n")
    async with running(config):
        big = await redis_client.xadd(f"{key_prefix}in", {"n": "100"})
        await redis_client.xadd(f"{key_prefix}in", {"n": "99"})  # range() is a step too
        await wait_for(lambda: redis_client.xlen(f"{key_prefix}dlq"), what="the long one")
        await wait_for(lambda: redis_client.xlen(f"{key_prefix}out"), what="the short one")
    [(_, out)] = await entries(redis_client, f"{key_prefix}out")
    assert out == {"dots": "." * 99}
    [(_, dead)] = await entries(redis_client, f"{key_prefix}dlq")
    assert dead["dlq_id"] == big
    assert dead["dlq_error"] == (
        "routes[0]: set.dots: template exceeded its step budget of 100 loop iterations and "
        "calls (templates.max_steps in config.yaml)"
    )


@pytest.fixture
async def servers() -> AsyncIterator[tuple[int, int, list[str]]]:
    """Two local endpoints, 127.0.0.1 and 127.0.0.2: each records the request target."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.host}{request.raw_path}")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    ports = []
    for host in ("127.0.0.1", "127.0.0.2"):
        site = web.TCPSite(runner, host, 0)
        await site.start()
        ports.append(runner.addresses[-1][1])
    try:
        yield ports[0], ports[1], seen
    finally:
        await runner.cleanup()


async def test_a_message_cannot_choose_where_a_request_goes(
    new_project: NewProject,
    redis_client: Any,
    key_prefix: str,
    servers: tuple[int, int, list[str]],
) -> None:
    """A URL whose host a message fills is refused at start; in the path and the query, a
    message's values are percent-encoded, so ``@host`` and ``&x=y`` stay in their place."""
    port, other, seen = servers
    flows = """
        version: 1
        streams:
          in: {{key: "{{P}}in"}}
          dlq: {{key: "{{P}}dlq"}}
        groups:
          hooks:
            stream: in
            dead_letter: dlq
            routes:
              - http: {{url: "{url}"}}
        """
    injectable = f"http://127.0.0.1:{port}" + "{{ msg.path }}"
    config, _ = new_project(flows.format(url=injectable))
    with pytest.raises(ValidationFailed, match="must be fixed text in the flow file"):
        async with running(config):
            pass
    url = f"http://127.0.0.1:{port}" + "/items/{{ msg.path }}?name={{ msg.name }}"
    config, _ = new_project(flows.format(url=url))
    async with running(config):
        await redis_client.xadd(
            f"{key_prefix}in", {"path": f"@127.0.0.2:{other}/stolen", "name": "x&admin=1"}
        )
        for n in range(40):
            await redis_client.xadd(f"{key_prefix}in", {"path": f"p{n}", "name": f"n{n}"})
        await wait_for(lambda: len(seen) >= 41, what="41 requests")
        await wait_for(lambda: none_pending(redis_client, f"{key_prefix}in", "hooks"))
    # the client may un-escape @ and : in a path (both mean nothing there): same host
    assert seen[0] == f"127.0.0.1:{port}/items/@127.0.0.2:{other}/stolen?name=x%26admin%3D1"
    assert sorted(seen[1:]) == sorted(f"127.0.0.1:{port}/items/p{n}?name=n{n}" for n in range(40))
    assert not any(s.startswith("127.0.0.2") for s in seen)
    assert await redis_client.xlen(f"{key_prefix}dlq") == 0


async def test_a_host_that_resolves_to_a_metadata_address_is_refused_before_connecting(
    new_project: NewProject,
    redis_client: Any,
    key_prefix: str,
    servers: tuple[int, int, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The runner checks what a host name resolves to: a link-local answer dead-letters that
    message with the reason; the group's 40 good messages are posted."""
    port, _, seen = servers
    real = socket.getaddrinfo

    def fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "cf-meta.test":  # a DNS name that points at the metadata service
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    config, _ = new_project(
        f"""
        version: 1
        streams:
          in: {{key: "{{P}}in"}}
          dlq: {{key: "{{P}}dlq"}}
        groups:
          hooks:
            stream: in
            dead_letter: dlq
            routes:
              - when: "msg.to == 'meta'"
                http: {{url: "http://cf-meta.test:{port}/latest/meta-data/"}}
              - http: {{url: "http://localhost:{port}/ok/{{{{ msg.n }}}}"}}
        """
    )
    async with running(config):
        meta = await redis_client.xadd(f"{key_prefix}in", {"to": "meta", "n": "m"})
        for n in range(40):
            await redis_client.xadd(f"{key_prefix}in", {"to": "ok", "n": str(n)})
        await wait_for(lambda: redis_client.xlen(f"{key_prefix}dlq"), what="the refused one")
        await wait_for(lambda: len(seen) >= 40, what="40 requests")
        await wait_for(lambda: none_pending(redis_client, f"{key_prefix}in", "hooks"))
    assert sorted(seen) == sorted(f"localhost:{port}/ok/{n}" for n in range(40))
    [(_, dead)] = await entries(redis_client, f"{key_prefix}dlq")
    assert dead["dlq_id"] == meta
    assert dead["dlq_error"] == (
        "routes[0]: request refused: cf-meta.test resolves to 169.254.169.254, a link-local "
        "address (169.254.0.0/16); requests there are refused unless http.allow in "
        "config.yaml lists it"
    )


CALL_FLOWS = """
    version: 1
    streams:
      in: {{key: "{{P}}in"}}
    groups:
      g:
        stream: in
        routes:
          - call: {target}
    """


async def test_dangerous_call_targets_are_refused_at_start_and_reload(
    new_project: NewProject, tmp_path: Path
) -> None:
    """``subprocess:run``, ``os:system``, ``builtins:eval`` and a re-export of one refuse to
    start; a reload to one is rejected; ``calls.allow`` lets one through."""
    for target in ("subprocess:run", "os:system", "builtins:eval"):
        config, _ = new_project(CALL_FLOWS.format(target=target))
        with pytest.raises(ValidationFailed, match=f'call target "{target}" is refused'):
            async with running(config):
                pass
    config, mod = new_project(CALL_FLOWS.format(target="{M}:run"), "from subprocess import run\n")
    with pytest.raises(ValidationFailed, match=r"it is subprocess\.run: module subprocess runs"):
        async with running(config):
            pass
    config, mod = new_project(CALL_FLOWS.format(target="{M}:ok"), "def ok(msg):\n    return None\n")
    async with running(config) as runner:
        flows = (tmp_path / "flows" / "main.yaml").read_text()
        (tmp_path / "flows" / "main.yaml").write_text(flows.replace(f"{mod}:ok", "os:system"))
        report = await runner.reload("test")
        assert report["outcome"] == "rejected"
        assert 'call target "os:system" is refused' in report["errors"][0]
        assert runner.tables["g"].routes[0].fn is not None
        assert runner.tables["g"].routes[0].route.call.function == f"{mod}:ok"  # type: ignore[union-attr]
    config, _ = new_project(CALL_FLOWS.format(target="subprocess:run"))
    config.write_text(config.read_text() + "calls: {allow: [subprocess]}\n")
    async with running(config) as runner:
        assert runner.tables["g"].routes[0].route.call.function == "subprocess:run"  # type: ignore[union-attr]
