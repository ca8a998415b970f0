"""Redis failures retrying cannot fix, each said in one exact line: credentials, TLS, DNS,
ACL and a database that is not a number. Against private servers started here."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis_servers import PrivateRedis, free_port
from tls_certs import make_certificates, tls_args, tls_server_binary

from cortex_flow.errors import ConnectionFailed, CortexFlowError
from cortex_flow.flow.loader import load_project
from cortex_flow.runtime.runner import Runner
from cortex_flow.wire.access import connect
from cortex_flow.wire.connection import describe_error, redis_from_url, wait_for_redis
from cortex_flow.wire.redis_errors import explain, redis_user

LOG = logging.getLogger("cortex_flow.test_redis_errors")
CA_FIX = (
    "give the CA that signed it with ?ssl_ca_certs=/path/to/ca.pem in redis.url "
    "(ssl_cert_reqs=none turns the check off: for tests only)"
)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server with a TLS port (certificate for localhost, signed by a test CA)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates")
    folder = tmp_path_factory.mktemp("tls")
    make_certificates(folder / "certs", "DNS:localhost")
    certs = folder / "certs"
    port = free_port()
    with PrivateRedis(folder / "data", args=tls_args(port, certs), binary=tls_server_binary()):
        yield port, certs


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """A redis-server whose default user needs the password ``s3cret``."""
    with PrivateRedis(tmp_path_factory.mktemp("auth"), args=("--requirepass", "s3cret")) as server:
        yield server


def _port(server: PrivateRedis) -> int:
    return server.port


# --- credentials -------------------------------------------------------------------------


async def test_wrong_password_names_the_credentials_not_the_server(secured: PrivateRedis) -> None:
    """A wrong password says so at once (run and status alike), never "is it running?"."""
    url = f"redis://:wrong@127.0.0.1:{secured.port}/0"
    expected = (
        f"Redis at redis://127.0.0.1:{secured.port} refused the password of user default "
        "(wrong password, or the user is disabled); fix the credentials in redis.url or "
        "CORTEX_REDIS_USERNAME / CORTEX_REDIS_PASSWORD"
    )
    client = redis_from_url(url)
    try:
        with pytest.raises(ConnectionFailed) as caught:
            await wait_for_redis(client, timeout=None, log=LOG)
    finally:
        await client.aclose()
    assert str(caught.value) == expected
    with pytest.raises(ConnectionFailed) as caught:
        await connect(url)
    assert str(caught.value) == expected


async def test_wrong_acl_user_password_names_the_user(secured: PrivateRedis) -> None:
    """A refused ACL user is named in the message."""
    with pytest.raises(ConnectionFailed) as caught:
        await connect(f"redis://bob:nope@127.0.0.1:{secured.port}")
    assert str(caught.value) == (
        f"Redis at redis://127.0.0.1:{secured.port} refused the password of user bob "
        "(wrong password, or the user is disabled); fix the credentials in redis.url or "
        "CORTEX_REDIS_USERNAME / CORTEX_REDIS_PASSWORD"
    )


async def test_missing_password_says_to_set_one(
    secured: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that wants a password, given none, says which variable to set."""
    monkeypatch.delenv("CORTEX_REDIS_PASSWORD", raising=False)
    with pytest.raises(ConnectionFailed) as caught:
        await connect(f"redis://127.0.0.1:{secured.port}")
    assert str(caught.value) == (
        f"Redis at redis://127.0.0.1:{secured.port} requires a password and none was given; "
        "set CORTEX_REDIS_PASSWORD (and CORTEX_REDIS_USERNAME for an ACL user) or put them "
        "in redis.url"
    )


# --- TLS ---------------------------------------------------------------------------------


async def test_tls_without_the_ca_is_a_certificate_failure(
    tls_server: tuple[int, Path],
) -> None:
    """TLS to a server whose CA is not given says the certificate does not verify and how
    to give the CA (it used to say "Operation not permitted"), at start too."""
    port, _ = tls_server
    expected = (
        f"TLS: the certificate of Redis at 127.0.0.1:{port} does not verify: self-signed "
        f"certificate in certificate chain; {CA_FIX}"
    )
    with pytest.raises(ConnectionFailed) as caught:
        await connect(f"rediss://127.0.0.1:{port}")
    assert str(caught.value) == expected
    client = redis_from_url(f"rediss://127.0.0.1:{port}")
    try:
        with pytest.raises(ConnectionFailed) as caught:  # fails at once: waiting cannot help
            await wait_for_redis(client, timeout=None, log=LOG)
    finally:
        await client.aclose()
    assert str(caught.value) == expected


async def test_tls_with_the_ca_connects(tls_server: tuple[int, Path]) -> None:
    """The fix the message gives works: ?ssl_ca_certs= with the CA."""
    port, certs = tls_server
    client = await connect(f"rediss://localhost:{port}?ssl_ca_certs={certs / 'ca.pem'}")
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_tls_name_mismatch_says_which_name(tls_server: tuple[int, Path]) -> None:
    """A certificate not issued for the address connected to names the mismatch and the fix."""
    port, certs = tls_server
    with pytest.raises(ConnectionFailed) as caught:
        await connect(f"rediss://127.0.0.1:{port}?ssl_ca_certs={certs / 'ca.pem'}")
    assert str(caught.value) == (
        f"TLS: the certificate of Redis at 127.0.0.1:{port} does not verify: IP address "
        "mismatch, certificate is not valid for '127.0.0.1'; connect with a name the "
        "certificate was issued for, or reissue it with this name in its subjectAltName"
    )


async def test_tls_client_certificate_required_says_how_to_give_one(tmp_path: Path) -> None:
    """A server that wants a client certificate (tls-auth-clients yes) says so."""
    make_certificates(tmp_path / "certs", "DNS:localhost")
    port = free_port()
    args = (*tls_args(port, tmp_path / "certs")[:-1], "yes")
    with (
        PrivateRedis(tmp_path / "data", args=args, binary=tls_server_binary()),
        pytest.raises(ConnectionFailed) as caught,
    ):
        await connect(f"rediss://localhost:{port}?ssl_ca_certs={tmp_path / 'certs' / 'ca.pem'}")
    # TLS 1.3 sends the server's alert after the handshake: the client reads it, or (the
    # server having closed first) sees a reset; either way the line says what to give
    assert str(caught.value) in (
        f"TLS handshake with Redis at rediss://localhost:{port} failed (tlsv13 alert "
        "certificate required); the server wants a client certificate: give it with "
        "?ssl_certfile=/path/cert.pem&ssl_keyfile=/path/key.pem in redis.url",
        f"TLS connection to Redis at rediss://localhost:{port} was reset during the "
        "handshake; the server may want a client certificate: give it with "
        "?ssl_certfile=/path/cert.pem&ssl_keyfile=/path/key.pem in redis.url",
    )


# --- DNS ---------------------------------------------------------------------------------


async def test_unresolvable_host_names_the_host(caplog: pytest.LogCaptureFixture) -> None:
    """A host name that does not resolve says so (it used to say "Unknown error -2"); the
    runner keeps trying, saying why, as a DNS record may yet appear."""
    expected = (
        "host name no-such-redis.invalid does not resolve (Name or service not known); "
        "check the host in redis.url (or CORTEX_REDIS_URL) and this machine's DNS"
    )
    with pytest.raises(ConnectionFailed) as caught:
        await connect("redis://no-such-redis.invalid:6379")
    assert str(caught.value) == expected
    client = redis_from_url("redis://no-such-redis.invalid:6379")
    try:
        with caplog.at_level(logging.WARNING, LOG.name), pytest.raises(ConnectionFailed) as caught:
            await wait_for_redis(client, timeout=0.5, log=LOG)
    finally:
        await client.aclose()
    assert str(caught.value) == (
        f"Redis at redis://no-such-redis.invalid:6379 was not reachable within 0.5s "
        f"({expected}). Check that the server is running and that redis.url in config.yaml "
        "(or CORTEX_REDIS_URL) points at it."
    )
    assert (
        caplog.records[0]
        .getMessage()
        .startswith(
            f"redis at redis://no-such-redis.invalid:6379 is not reachable ({expected}); retrying"
        )
    )


# --- ACL ---------------------------------------------------------------------------------


async def test_acl_refusals_name_command_categories_and_grant(private_redis: PrivateRedis) -> None:
    """A command the ACL refuses is named with its categories and the ACL SETUSER that
    grants it; a refused key is named with the ~pattern to add."""
    admin = redis.Redis(port=private_redis.port)
    admin.acl_setuser("bob", enabled=True, passwords=["+pw"], keys=["app:*"],
                      commands=["+@all", "-xautoclaim", "-xgroup|create"])  # fmt: skip
    url = f"redis://bob:pw@127.0.0.1:{private_redis.port}"
    client = redis_from_url(url)
    try:
        assert redis_user(client) == "bob"
        found = []
        for call in (
            lambda: client.xautoclaim("app:s", "g", "c", 10, "0-0"),
            lambda: client.xgroup_create("app:s", "g", mkstream=True),
            lambda: client.xreadgroup("g", "c", {"other:s": ">"}),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError) as caught:
                await call()
            why = explain(caught.value, user="bob", command="XREADGROUP", keys=["other:s"])
            assert why is not None and why.kind == "acl"
            found.append(why.text)
        await client.xadd("app:s", {"a": "1"})  # the rest is allowed
    finally:
        await client.aclose()
        admin.close()
    assert found == [
        "Redis user bob may not run XAUTOCLAIM (ACL categories @write @stream @fast); grant "
        "it with ACL SETUSER bob +xautoclaim or +@stream",
        "Redis user bob may not run XGROUP|CREATE (ACL categories @write @stream @slow); "
        "grant it with ACL SETUSER bob +xgroup|create or +@stream",
        "Redis user bob may not access the key other:s (XREADGROUP); grant it with "
        "ACL SETUSER bob ~other:s (or a ~pattern that covers it)",
    ]


def test_describe_error_of_dns_and_tls_is_not_an_errno() -> None:
    """describe_error never turns a DNS or TLS failure into "Unknown error -2" or
    "Operation not permitted" (the errno of an SSL error)."""
    import socket
    import ssl

    dns = redis.exceptions.ConnectionError("Error -2 connecting to x.invalid:6379.")
    dns.__cause__ = socket.gaierror(-2, "Name or service not known")
    assert describe_error(dns).startswith("host name x.invalid does not resolve")
    tls = redis.exceptions.ConnectionError("Error 1 connecting to 127.0.0.1:6380.")
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "certificate has expired"
    tls.__cause__ = cause
    assert describe_error(tls) == (
        "TLS: the certificate of Redis at 127.0.0.1:6380 does not verify: certificate has "
        "expired; renew the server's certificate (or check this machine's clock)"
    )


# --- the database number -----------------------------------------------------------------


def test_database_that_is_not_a_number_is_a_validate_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis://host/abc is refused by validate at its place (redis-py would use db 0)."""
    from cortex_flow.cli import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "main.yaml").write_text("version: 1\nstreams:\n  s: {key: s}\n")
    (tmp_path / "config.yaml").write_text("redis:\n  url: redis://127.0.0.1:6379/abc\n")
    assert cli("validate") == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        "config.yaml:2:8: redis.url: \"redis://127.0.0.1:6379/abc\": database 'abc' is not a "
        "number (redis-py would silently use 0); write the number after the host, e.g. "
        "redis://host:6379/0, or leave it out"
    )


async def test_database_that_is_not_a_number_is_a_clear_error_at_run(tmp_path: Path) -> None:
    """A runner given redis://host/abc directly fails to start with one line."""
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "main.yaml").write_text("version: 1\nstreams:\n  s: {key: s}\n")
    (tmp_path / "config.yaml").write_text("admin: {listen: 'off'}\n")
    runner = Runner(load_project(tmp_path / "config.yaml"), url="redis://127.0.0.1:1/abc")
    with pytest.raises(CortexFlowError) as caught:
        await runner.start()
    await runner.stop(1)
    assert str(caught.value) == (
        "redis.url: 'redis://127.0.0.1:1/abc': database 'abc' is not a number (redis-py "
        "would silently use 0); write the number after the host, e.g. redis://host:6379/0, "
        "or leave it out"
    )
