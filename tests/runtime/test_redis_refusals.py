"""What Redis refuses a running runner (ACL, credentials), with real ACL users on a private
server: the runner runs what it can, counts every message, and says the rest in one line
in its log, ``status`` and ``/readyz``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from projects import module, wait_for, write_module, write_project
from redis_servers import PrivateRedis, free_port
from tls_certs import make_certificates, tls_args, tls_server_binary

from cortex_flow.flow.config import AdminSettings
from cortex_flow.flow.loader import load_project
from cortex_flow.ops.status import probe_admin
from cortex_flow.runtime.runner import Runner

FLOWS = """
    version: 1
    streams:
      a: {key: "{P}a"}
      b: {key: "{P}b"}
    groups:
      ga:
        stream: a
        retry: {claim_idle: 100ms, backoff: {initial: 50ms}}
        routes:
          - call: {M}:handle
      gb:
        stream: b
        routes:
          - call: {M}:handle
"""

HANDLERS = """
    handled = []

    async def handle(msg):
        handled.append(msg["n"])
"""

GRANT_XGROUP = (
    "Redis user bob may not run XGROUP|CREATE (ACL categories @write @stream @slow); "
    "grant it with ACL SETUSER bob +xgroup|create or +@stream"
)


class Setup:
    """A private server, an admin client to it, a handler module and a project for user bob."""

    def __init__(self, server: PrivateRedis, folder: Path) -> None:
        self.server = server
        self.admin = redis.Redis(port=server.port, decode_responses=True)
        self.folder = folder
        self.mod = write_module(folder, HANDLERS)
        self.a, self.b = "t:a", "t:b"

    def command(self, *args: str) -> Any:
        return self.admin.execute_command(*args)  # type: ignore[no-untyped-call]

    def user(self, *rules: str) -> None:
        self.command("ACL", "SETUSER", "bob", "reset", "on", ">pw", *rules)

    def add(self, key: str, numbers: range) -> None:
        for n in numbers:
            self.admin.xadd(key, {"n": str(n)})

    @property
    def handled(self) -> list[str]:
        return list(module(self.mod).handled)

    @asynccontextmanager
    async def runner(self, flows: str = FLOWS, url: str | None = None) -> AsyncIterator[Runner]:
        url = url or f"redis://bob:pw@127.0.0.1:{self.server.port}/0"
        config = write_project(
            self.folder,
            flows,
            config=(
                f"redis: {{url: '{url}'}}\n"
                "runner: {name: r1, shutdown_grace: 5s}\nreload: {watch: false}\n"
                "admin: {listen: '127.0.0.1:0'}\n"
            ),
            prefix="t:",
            mod=self.mod,
        )
        runner = Runner(load_project(config), block=0.1)
        await runner.start()
        try:
            yield runner
        finally:
            await runner.stop(5)
            self.admin.close()


@pytest.fixture
def setup(private_redis: PrivateRedis, tmp_path: Path) -> Setup:
    return Setup(private_redis, tmp_path)


def problems(runner: Runner) -> tuple[bool, list[str]]:
    ready, detail = runner.ready()
    return ready, detail["problems"]


def count_calls(client: Any, name: str) -> Callable[[], int]:
    """Count the calls of ``client.name`` from now on; returns a reader of the count."""
    original, calls = getattr(client, name), [0]

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await original(*args, **kwargs)

    setattr(client, name, counted)
    return lambda: calls[0]


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "\n" not in record.getMessage(), record.getMessage()


async def test_group_that_cannot_be_created_is_blocked_and_others_run(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """Without XGROUP CREATE, a group an administrator made runs; the other is reported
    blocked (one line, no traceback) until the permission is granted, then catches up."""
    setup.admin.xgroup_create(setup.b, "gb", id="0", mkstream=True)
    setup.user("~*", "+@all", "-xgroup|create")
    setup.add(setup.a, range(10))
    setup.add(setup.b, range(100, 110))
    blocked = f"group ga: blocked: reads and claims of its own entries are refused: {GRANT_XGROUP}"
    with caplog.at_level(logging.INFO, logger="cortex_flow"):
        async with setup.runner() as runner:
            await wait_for(lambda: len(setup.handled) == 10, what="gb's 10 messages")
            await wait_for(lambda: problems(runner) == (False, [blocked]), what="ga blocked")
            assert sorted(setup.handled) == [str(n) for n in range(100, 110)]
            status = await probe_admin(AdminSettings(listen=f"127.0.0.1:{runner.admin.bound_port}"))
            assert (status["ready"], status["problems"]) == (False, [blocked])

            setup.command("ACL", "SETUSER", "bob", "+xgroup|create")
            await wait_for(lambda: len(setup.handled) == 20, what="ga's 10 messages")
            await wait_for(lambda: problems(runner) == (True, []), what="ga unblocked")
    assert sorted(setup.handled) == sorted(str(n) for n in [*range(10), *range(100, 110)])
    no_traceback(caplog)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert said[0] == (
        f"group ga on t:a cannot be created: {GRANT_XGROUP}; the group waits for it, the others run"
    )
    assert said[1].startswith(f"group ga: blocked: reads and claims of its own entries are "
                              f"refused: {GRANT_XGROUP}; trying again")  # fmt: skip
    assert "group ga: reads work again" in caplog.messages


async def test_read_refused_by_acl_blocks_only_that_group(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """A user whose ACL refuses one group's key: that group is blocked with the key and the
    grant named, in /readyz (503) and status; the other group delivers all its messages."""
    for key, group in ((setup.a, "ga"), (setup.b, "gb")):
        setup.admin.xgroup_create(key, group, id="0", mkstream=True)
    setup.user("~t:b", "+@all")
    setup.add(setup.a, range(5))
    setup.add(setup.b, range(100, 120))
    blocked = (
        "group ga: blocked: reads and claims of its own entries are refused: Redis user bob "
        "may not access the key t:a; grant it with ACL SETUSER bob ~t:a (or a ~pattern "
        "that covers it)"
    )
    with caplog.at_level(logging.INFO, logger="cortex_flow"):
        async with setup.runner() as runner:
            await wait_for(lambda: len(setup.handled) == 20, what="gb's 20 messages")
            await wait_for(lambda: problems(runner) == (False, [blocked]), what="ga blocked")
            status = await probe_admin(AdminSettings(listen=f"127.0.0.1:{runner.admin.bound_port}"))
            assert (status["ready"], status["problems"]) == (False, [blocked])
            setup.command("ACL", "SETUSER", "bob", "~t:a")
            await wait_for(lambda: len(setup.handled) == 25, what="ga's 5 messages")
    assert sorted(setup.handled) == sorted(str(n) for n in [*range(5), *range(100, 120)])
    no_traceback(caplog)


async def test_crash_recovery_refused_is_said_once_per_interval_and_reads_go_on(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """Without XCLAIM an entry a dead consumer left idle cannot be claimed: the refusal is
    one error line per interval (not a traceback per claim cycle) and a problem in status,
    not blocking; every new message is still delivered."""
    for key, group in ((setup.a, "ga"), (setup.b, "gb")):
        setup.admin.xgroup_create(key, group, id="0", mkstream=True)
    setup.add(setup.a, range(1000, 1001))
    setup.admin.xreadgroup("ga", "ghost", {setup.a: ">"})  # pending in a consumer long gone
    setup.user("~*", "+@all", "-xclaim")
    setup.add(setup.a, range(10))
    line = (
        "group ga: crash recovery is off: claims of entries idle past claim_idle are refused: "
        "Redis user bob may not run XCLAIM (ACL categories @write @stream @fast); grant "
        "it with ACL SETUSER bob +xclaim or +@stream"
    )
    with caplog.at_level(logging.INFO, logger="cortex_flow"):
        async with setup.runner() as runner:
            await wait_for(lambda: len(setup.handled) == 10, what="ga's 10 messages")
            # claim cycles run every 25 ms: wait for many refusals
            stats = runner.stats.groups["ga"]
            await wait_for(lambda: stats.redis_errors.get("acl", 0) >= 10, what="10 cycles")
            ready, found = problems(runner)
            assert ready is True and line in found
    assert sorted(setup.handled, key=int) == [str(n) for n in range(10)]
    no_traceback(caplog)
    errors = [r.getMessage() for r in caplog.records if "crash recovery is off" in r.getMessage()]
    assert len(errors) == 1  # ga's, once within the interval (gb has nothing idle)
    assert errors[0].startswith(line + "; reads and retries go on (1 time since last said)")


async def test_password_changed_mid_run_blocks_then_recovers(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """A password changed under a running runner: its groups are blocked with the
    credentials named (not "is the server running?"), /readyz is 503; once it is restored
    every message is delivered exactly once."""
    for key, group in ((setup.a, "ga"), (setup.b, "gb")):
        setup.admin.xgroup_create(key, group, id="0", mkstream=True)
    setup.user("~*", "+@all")
    setup.add(setup.b, range(5))
    port = setup.server.port
    refused = (
        "blocked: reads and claims of its own entries are refused: Redis at "
        f"redis://127.0.0.1:{port} refused the password of user bob (wrong password, or the "
        "user is disabled); fix the credentials in redis.url or CORTEX_REDIS_USERNAME / "
        "CORTEX_REDIS_PASSWORD"
    )
    with caplog.at_level(logging.INFO, logger="cortex_flow"):
        async with setup.runner() as runner:
            await wait_for(lambda: len(setup.handled) == 5, what="the first 5")
            setup.command("ACL", "SETUSER", "bob", "resetpass", ">rotated")
            setup.command("CLIENT", "KILL", "USER", "bob")
            expected = (False, [f"group ga: {refused}", f"group gb: {refused}"])
            await wait_for(lambda: problems(runner) == expected, what="both groups blocked")
            setup.add(setup.a, range(10, 15))
            setup.add(setup.b, range(5, 10))
            setup.command("ACL", "SETUSER", "bob", "resetpass", ">pw")
            await wait_for(lambda: len(setup.handled) == 15, timeout=20, what="all 15")
            await wait_for(lambda: problems(runner) == (True, []), what="unblocked")
    assert sorted(setup.handled, key=int) == [str(n) for n in range(15)]
    assert not any("is the server running" in m for m in caplog.messages)


async def test_commit_refused_by_acl_keeps_the_outcomes_until_granted(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """Without XACK the handled messages are kept (a commit problem in status, an error
    line), none is lost or run twice; granting XACK commits them."""
    for key, group in ((setup.a, "ga"), (setup.b, "gb")):
        setup.admin.xgroup_create(key, group, id="0", mkstream=True)
    setup.user("~*", "+@all", "-xack", "-evalsha", "-eval")
    setup.add(setup.b, range(8))
    with caplog.at_level(logging.INFO, logger="cortex_flow"):
        async with setup.runner() as runner:
            await wait_for(lambda: len(setup.handled) == 8, what="8 handled")
            await wait_for(
                lambda: any("commits wait" in p for p in problems(runner)[1]),
                what="a commit problem",
            )
            assert setup.admin.xpending(setup.b, "gb")["pending"] == 8
            setup.command("ACL", "SETUSER", "bob", "+xack", "+evalsha", "+eval")
            await wait_for(
                lambda: setup.admin.xpending(setup.b, "gb")["pending"] == 0, what="all acked"
            )
            await wait_for(lambda: problems(runner) == (True, []), what="commit problem gone")
    assert sorted(setup.handled, key=int) == [str(n) for n in range(8)]
    no_traceback(caplog)


async def test_least_privilege_user_runs_every_group(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """The ACL that docs/operating.md gives as the least a runner needs runs both groups
    (creating them) with no problem and no error logged."""
    setup.user("~t:*", "+@stream", "+evalsha", "+eval", "+script|load", "+ping",
               "+client|setname", "+get", "+set", "+incr", "+del", "+pexpire", "+hget",
               "+hset", "+type", "+time", "+expire", "+hgetall", "+hincrby", "+hdel", "+publish",
               "+subscribe", "+zadd", "+zrangebyscore", "+zremrangebyscore", "+hmget",
               "+zrem", "+zcard", "+zrange", "+zscore", "&t:cancel")  # fmt: skip
    setup.add(setup.a, range(5))
    setup.add(setup.b, range(5, 10))
    with caplog.at_level(logging.WARNING, logger="cortex_flow"):
        async with setup.runner(FLOWS.replace("claim_idle: 100ms", "claim_idle: 30s")) as runner:
            await wait_for(lambda: len(setup.handled) == 10, what="all 10")
            assert problems(runner) == (True, [])
            await runner.refresh()  # the gauges of a metrics scrape
    assert sorted(setup.handled, key=int) == [str(n) for n in range(10)]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


HEARTBEAT_FLOWS = FLOWS.replace(
    '      b: {key: "{P}b"}\n',
    '      b: {key: "{P}b"}\n      hb: {key: "{P}hb"}\n',
).replace("    groups:\n", "    heartbeats: {stream: hb}\n    groups:\n")


async def test_heartbeat_stream_refused_is_said_once_and_groups_run(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat stream the ACL refuses: the groups deliver everything; the refusal is
    said with the key and the grant, not once a second."""
    setup.user("~t:a", "~t:b", "+@all")
    setup.add(setup.a, range(5))
    grant = (
        "Redis user bob may not access the key t:hb; grant it with ACL SETUSER bob "
        "~t:hb (or a ~pattern that covers it)"
    )
    with caplog.at_level(logging.WARNING, logger="cortex_flow"):
        async with setup.runner(HEARTBEAT_FLOWS) as runner:
            reads = count_calls(runner.client, "xread")
            await wait_for(lambda: len(setup.handled) == 5, what="all 5")
            await wait_for(lambda: reads() >= 3, what="three refused reads of t:hb")
    assert sorted(setup.handled, key=int) == [str(n) for n in range(5)]
    said = [r.getMessage() for r in caplog.records]
    assert (
        "cannot read t:hb to check that no other runner is named r1 "
        f"({grant}); starting anyway" in said
    )
    reading = f"heartbeats: reading t:hb failed ({grant}); retrying every second"
    assert [line for line in said if line.startswith(reading)] == [f"{reading} (1 time so far)"]
    no_traceback(caplog)


async def test_certificate_replaced_mid_run_blocks_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarted with a certificate from another CA: the groups are blocked with the
    certificate problem and the fix, /readyz is 503; back on the trusted certificate every
    message is delivered exactly once."""
    trusted, other = tmp_path / "trusted", tmp_path / "other"
    make_certificates(trusted, "DNS:localhost")
    make_certificates(other, "DNS:localhost")
    tls_port = free_port()
    server = PrivateRedis(
        tmp_path / "data",
        args=tls_args(tls_port, trusted),
        appendonly=True,
        binary=tls_server_binary(),
    )
    with server:
        setup = Setup(server, tmp_path)
        for key, group in ((setup.a, "ga"), (setup.b, "gb")):
            setup.admin.xgroup_create(key, group, id="0", mkstream=True)
        setup.add(setup.b, range(5))
        url = f"rediss://localhost:{tls_port}/0?ssl_ca_certs={trusted / 'ca.pem'}"
        refused = (
            f"blocked: reads and claims of its own entries are refused: TLS: the certificate "
            f"of Redis at localhost:{tls_port} does not verify: self-signed certificate in "
            "certificate chain; give the CA that signed it with ?ssl_ca_certs=/path/to/ca.pem "
            "in redis.url (ssl_cert_reqs=none turns the check off: for tests only)"
        )
        with caplog.at_level(logging.INFO, logger="cortex_flow"):
            async with setup.runner(url=url) as runner:
                await wait_for(lambda: len(setup.handled) == 5, what="the first 5")
                server.args = tls_args(tls_port, other)
                server.restart()
                setup.admin = redis.Redis(port=server.port, decode_responses=True)
                expected = (False, [f"group ga: {refused}", f"group gb: {refused}"])
                await wait_for(lambda: problems(runner) == expected, what="both blocked")
                setup.add(setup.a, range(10, 15))
                setup.add(setup.b, range(5, 10))
                server.args = tls_args(tls_port, trusted)
                server.restart()
                await wait_for(lambda: len(setup.handled) == 15, timeout=20, what="all 15")
                await wait_for(lambda: problems(runner) == (True, []), what="unblocked")
    assert sorted(setup.handled, key=int) == [str(n) for n in range(15)]
    assert not any("Operation not permitted" in m for m in caplog.messages)


TO_FLOWS = """
    version: 1
    streams:
      a: {key: "{P}a"}
      b: {key: "{P}b"}
      c: {key: "{P}c"}
    groups:
      ga:
        stream: a
        routes:
          - to: c
      gb:
        stream: b
        routes:
          - call: {M}:handle
"""


async def test_publish_refused_by_acl_names_the_keys_and_loses_nothing(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """A `to` route whose target key the ACL refuses: the commit waits (a problem naming
    the keys it writes), the other group runs; granting the key publishes each message once."""
    for key, group in ((setup.a, "ga"), (setup.b, "gb")):
        setup.admin.xgroup_create(key, group, id="0", mkstream=True)
    setup.user("~t:a", "~t:b", "+@all")
    setup.add(setup.a, range(3))
    setup.add(setup.b, range(10, 13))
    waiting = (
        "group ga: commits wait: acknowledging and publishing are refused: Redis user bob "
        "may not access one of the keys t:a, t:c; grant them with ACL SETUSER bob ~t:a ~t:c "
        "(or a ~pattern that covers them)"
    )
    with caplog.at_level(logging.INFO, logger="cortex_flow"):
        async with setup.runner(TO_FLOWS) as runner:
            await wait_for(lambda: problems(runner) == (True, [waiting]), what="commit waits")
            await wait_for(lambda: len(setup.handled) == 3, what="gb's 3 messages")
            assert setup.admin.xlen("t:c") == 0
            setup.command("ACL", "SETUSER", "bob", "~t:c")
            await wait_for(lambda: setup.admin.xlen("t:c") == 3, what="3 published")
            await wait_for(
                lambda: setup.admin.xpending(setup.a, "ga")["pending"] == 0, what="all acked"
            )
            await wait_for(lambda: problems(runner) == (True, []), what="problem gone")
    published: Any = setup.admin.xrange("t:c")
    assert sorted(fields["n"] for _, fields in published) == ["0", "1", "2"]
    no_traceback(caplog)
