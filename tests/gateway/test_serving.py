"""The gateway as a user runs it: `cortex-flow gateway`, beside `cortex-flow run`, over TLS;
and the config rules that keep it off and on loopback."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import HAROLD, write
from projects import end, lines, spawn_runner, wait_for_sync
from redis_servers import free_port
from tls_certs import make_certificates

from cortex_flow.errors import ValidationFailed
from cortex_flow.flow.loader import load_project

ENV = {"HAROLD_TOKEN": HAROLD, "MAUDE_TOKEN": "m" * 20}


def _spawn(verb: str, config: Path, log: Path) -> subprocess.Popen[str]:
    if verb == "run":
        return spawn_runner(config, log, env=ENV)
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cortex_flow", verb, "--config", str(config)],
            cwd=config.parent,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **ENV},
        )


@pytest.mark.parametrize("verb", ["gateway", "run"])
async def test_served_by_its_own_command_and_by_run(
    verb: str, tmp_path: Path, redis_url: str, key_prefix: str, redis_client: aioredis.Redis
) -> None:
    """`cortex-flow gateway` and `cortex-flow run` with gateway.listen both take a publish."""
    port = free_port()
    config = write(tmp_path, redis_url, key_prefix, f"{{listen: '127.0.0.1:{port}'}}")
    log = tmp_path / "out.log"
    process = _spawn(verb, config, log)
    try:
        wait_for_sync(lambda: any("gateway on http://" in line for line in lines(log)), 30,
                      "the gateway to listen")  # fmt: skip
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"http://127.0.0.1:{port}/v1/streams/tasks?priority=low",
                json={"from": verb},
                headers={"Authorization": f"Bearer {HAROLD}"},
            )
            assert resp.status == 202, await resp.text()
            entry_id = (await resp.json())["id"]
        [(got, fields)] = await redis_client.xrange(f"{key_prefix}tasks:low")
        assert (got, fields) == (entry_id, {"from": verb})
        assert HAROLD not in log.read_text()
    finally:
        process.terminate()
        try:
            process.wait(20)
        finally:
            end(process)
    assert process.returncode == 0, log.read_text()


async def test_tls(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    """With gateway.tls it answers HTTPS only."""
    from cortex_flow.gateway import Gateway
    from cortex_flow.wire.access import connect

    make_certificates(tmp_path / "certs", "IP:127.0.0.1")
    port = free_port()
    settings = (
        f"{{listen: '127.0.0.1:{port}', tls: {{cert: certs/server.pem, key: certs/server.key}}}}"
    )
    project = load_project(write(tmp_path, redis_url, key_prefix, settings), env=ENV)
    context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.pem"))
    gateway = Gateway(lambda: project, lambda: connect(redis_url))
    async with gateway, aiohttp.ClientSession() as http:
        resp = await http.get(f"https://127.0.0.1:{gateway.bound_port}/", ssl=context)
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            await http.get(f"http://127.0.0.1:{gateway.bound_port}/")


def _problems(tmp_path: Path, redis_url: str, gateway: str, flows: str | None = None) -> str:
    config = write(tmp_path, redis_url, "p:", gateway)
    if flows is not None:
        (tmp_path / "flows" / "main.yaml").write_text(flows)
    with pytest.raises(ValidationFailed) as caught:
        load_project(config, env=ENV)
    return str(caught.value)


def test_off_by_default_and_loopback_unless_told(tmp_path: Path, redis_url: str) -> None:
    """No gateway: section means off; a public listen needs allow_public, a wildcard hosts."""
    assert load_project(write(tmp_path, redis_url, "p:"), env=ENV).config.gateway.listen is None
    public = _problems(tmp_path, redis_url, "{listen: '10.0.0.5:8480'}")
    assert (
        "gateway.listen 10.0.0.5:8480 is not a loopback address; set gateway.allow_public" in public
    )
    wild = _problems(tmp_path, redis_url, "{listen: '0.0.0.0:8480', allow_public: true}")
    assert "list them in gateway.allowed_hosts" in wild


def test_agent_tokens_come_from_the_environment(tmp_path: Path, redis_url: str) -> None:
    """A token written in the flow file is refused at its place; a short one never shown."""
    flows = (
        "version: 1\nstreams: {tasks: {key: t}}\n"
        f"agents:\n  harold: {{token: {HAROLD}, may_send: [taks]}}\n"
    )
    text = _problems(tmp_path, redis_url, "{}", flows)
    assert "agents.harold.token: must come from the environment" in text
    assert "write agents.harold.token: ${HAROLD_TOKEN}" in text
    assert 'stream "taks" is not a declared stream; did you mean "tasks"?' in text
    assert HAROLD not in text
    short = "version: 1\nagents:\n  harold: {token: '${SHORT}'}\n"
    (tmp_path / "flows" / "main.yaml").write_text(short)
    with pytest.raises(ValidationFailed) as caught:
        load_project(tmp_path / "config.yaml", env={"SHORT": "abc123"})
    assert "must be at least 16 characters" in str(caught.value)
    assert "abc123" not in str(caught.value)


def test_tokens_are_not_in_the_topology_the_admin_endpoint_serves(
    tmp_path: Path, redis_url: str
) -> None:
    """GET /topology (and plan) show a digest of an agent's token, never the token."""
    from cortex_flow.flow.exposed import read_doc, topology_doc

    project = load_project(write(tmp_path, redis_url, "p:"), env=ENV)
    doc = topology_doc(project.topology, project.config, "r1")
    assert HAROLD not in json.dumps(doc)
    assert doc["flows"]["agents"]["harold"]["token"].startswith("hidden-")
    assert read_doc(doc)[1].agents["harold"].may_send == ["tasks", "inbox", "notes"]


def test_schema_check_fails_on_a_stale_openapi_document(tmp_path: Path) -> None:
    """`cortex-flow schema --check` (make validate) covers schemas/gateway.openapi.json."""
    from cortex_flow.cli.main import cli

    assert cli("schema", "--out", str(tmp_path)) == 0
    doc = tmp_path / "gateway.openapi.json"
    assert json.loads(doc.read_text())["paths"]["/v1/streams/{stream}"]["post"]
    assert cli("schema", "--check", "--out", str(tmp_path)) == 0
    doc.write_text("{}\n")
    assert cli("schema", "--check", "--out", str(tmp_path)) == 1


def test_gateway_command_with_the_gateway_off_says_how_to_turn_it_on(
    tmp_path: Path,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cortex-flow gateway` without gateway.listen is a usage error naming the setting."""
    from cortex_flow.cli.main import cli

    config = write(tmp_path, redis_url, "p:")
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert cli("gateway", "--config", str(config)) == 2
    assert "gateway.listen is off" in capsys.readouterr().err
