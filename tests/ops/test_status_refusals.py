"""`cortex-flow status` run as a Redis user the ACL limits: the refusal and its fix, not a
stream "of type error"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from projects import write_project
from redis_servers import PrivateRedis

from cortex_flow.cli import cli

FLOWS = """
    version: 1
    streams:
      jobs: {key: "app:jobs"}
      other: {key: "secret:jobs"}
    groups:
      g:
        stream: jobs
        routes:
          - drop: true
"""


def test_status_names_the_key_the_acl_refuses(
    private_redis: PrivateRedis,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key the user may not read is a problem naming the key and the ACL SETUSER grant."""
    admin = redis.Redis(port=private_redis.port)
    admin.acl_setuser("kim", enabled=True, passwords=["+pw"], keys=["app:*"], commands=["+@all"])
    admin.close()
    write_project(
        tmp_path,
        FLOWS,
        config=f"redis: {{url: 'redis://kim:pw@127.0.0.1:{private_redis.port}'}}\n"
        "admin: {listen: 'off'}\n",
    )
    monkeypatch.chdir(tmp_path)
    cli("status", "--json")
    data = json.loads(capsys.readouterr().out)
    assert data["problems"][0] == (
        "cannot read secret:jobs: Redis user kim may not access the key secret:jobs (TYPE); "
        "grant it with ACL SETUSER kim ~secret:jobs (or a ~pattern that covers it)"
    )
