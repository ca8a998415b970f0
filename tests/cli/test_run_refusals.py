"""`cortex-flow run` against a Redis that refuses it: one line and exit 1, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from projects import write_project
from redis_servers import PrivateRedis

FLOW = """
    version: 1
    streams:
      jobs: {key: "jobs"}
    groups:
      work:
        stream: jobs
        routes:
          - drop: true
"""


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex_flow", "run", "--config", str(config)],
        cwd=config.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_run_with_a_wrong_password_exits_1_with_one_line(tmp_path: Path) -> None:
    """A refused password ends `run` at once: the credentials are named, no traceback."""
    with PrivateRedis(tmp_path / "redis", args=("--requirepass", "s3cret")) as server:
        url = f"redis://:wrong@127.0.0.1:{server.port}/0"
        config = write_project(
            tmp_path, FLOW, config=f"redis: {{url: '{url}'}}\nadmin: {{listen: 'off'}}\n"
        )
        done = _run(config)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: Redis at redis://127.0.0.1:{server.port} refused the password of user default "
        "(wrong password, or the user is disabled); fix the credentials in redis.url or "
        "CORTEX_REDIS_USERNAME / CORTEX_REDIS_PASSWORD"
    )


def test_run_with_a_database_that_is_not_a_number_exits_1_at_its_place(tmp_path: Path) -> None:
    """redis://host/abc stops `run` before connecting, with file:line:col."""
    config = write_project(
        tmp_path, FLOW, config="redis:\n  url: redis://127.0.0.1:6379/abc\nadmin: {listen: 'off'}\n"
    )
    done = _run(config)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        "config.yaml:2:8: redis.url: \"redis://127.0.0.1:6379/abc\": database 'abc' is not a "
        "number (redis-py would silently use 0); write the number after the host, e.g. "
        "redis://host:6379/0, or leave it out"
    ) in done.stderr.splitlines()
