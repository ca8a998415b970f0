"""The runner's Redis-derived gauges (pending, lag) and its admin endpoint settings."""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

import pytest
from projects import make_project, running, write_project

from cortex_flow.flow.loader import load_project
from cortex_flow.runtime.runner import Runner

FLOW = """
    version: 1
    streams:
      tasks:
        key: "{P}tasks:{{ priority }}"
        priorities: [high, low]
    groups:
      g1:
        stream: tasks
        retry: {claim_idle: 1h}
        routes:
          - drop: true
"""


class Sabotaged:
    """A pipeline whose XPENDING / XINFO GROUPS fail for chosen keys (others pass through)."""

    def __init__(self, pipe: Any, xpending: set[str], xinfo: set[str], not_a_stream: str) -> None:
        self.pipe = pipe
        self.bad_xpending = xpending
        self.bad_xinfo = xinfo
        self.not_a_stream = not_a_stream

    def xpending(self, key: str, group: str) -> Any:
        return self.pipe.xpending(key, "no-such-group" if key in self.bad_xpending else group)

    def xinfo_groups(self, key: str) -> Any:
        return self.pipe.xinfo_groups(self.not_a_stream if key in self.bad_xinfo else key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return int(reply.status)


def _direct(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError("refresh must not send XPENDING / XINFO one by one")


async def test_refresh_reads_every_gauge_in_one_pipeline_and_keeps_what_fails(
    tmp_path: Path,
    redis_url: str,
    redis_client: Any,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pending, per-consumer pending and lag come from one pipeline; a failed read keeps
    its previous gauge and says so at debug level instead of vanishing silently."""
    high, low = f"{key_prefix}tasks:high", f"{key_prefix}tasks:low"
    for key in (high, low):
        await redis_client.xgroup_create(key, "g1", id="0", mkstream=True)
    ids = [await redis_client.xadd(high, {"n": str(n)}) for n in range(2)]
    await redis_client.xadd(low, {"n": "2"})
    await redis_client.xreadgroup("g1", "ghost", {high: ">", low: ">"}, count=10)
    config = make_project(tmp_path, FLOW, url=redis_url, prefix=key_prefix)
    async with running(config) as runner:
        client = runner.client
        client.xpending = client.xinfo_groups = _direct  # consumers use neither
        stats = runner.stats

        await runner.refresh()
        assert stats.pending == {("g1", high): 2, ("g1", low): 1}
        assert stats.consumers == {("g1", high, "ghost"): 2, ("g1", low, "ghost"): 1}
        assert stats.lag == {("g1", high): 0, ("g1", low): 0}
        assert stats.oldest_pending_age[("g1", high)] >= 0

        await redis_client.xack(high, "g1", ids[0])
        stats.lag[("g1", low)] = 99
        pipeline = client.pipeline
        not_a_stream = f"{key_prefix}string"
        await redis_client.set(not_a_stream, "x")
        client.pipeline = lambda **kw: Sabotaged(pipeline(**kw), {low}, {low}, not_a_stream)
        with caplog.at_level(logging.DEBUG, logger="cortex_flow.runner"):
            await runner.refresh()
        assert stats.pending == {("g1", high): 1, ("g1", low): 1}  # low: the previous value
        assert stats.lag[("g1", low)] == 99
        failures = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
        assert any(f"XPENDING {low} g1 failed" in m and "NOGROUP" in m for m in failures)
        assert any(f"XINFO GROUPS {low} failed" in m and "WRONGTYPE" in m for m in failures)

        client.pipeline = pipeline
        await redis_client.xack(high, "g1", ids[1])
        await runner.refresh()
        # XPENDING lists only consumers with entries: one that has none left reads 0
        assert stats.consumers[("g1", high, "ghost")] == 0
        assert stats.pending[("g1", high)] == 0


def _post(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_admin_allow_public_reaches_the_endpoint(
    tmp_path: Path, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """admin.allow_public with a token lets the runner listen beyond loopback; POST /reload
    then takes the token from CORTEX_ADMIN_TOKEN, and only from Host names allowed."""
    token = "runner-admin-token-0123456789"
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", token)
    config = write_project(
        tmp_path,
        FLOW,
        config=(
            f"redis: {{url: '{redis_url}'}}\nrunner: {{name: t1}}\nreload: {{watch: false}}\n"
            "admin: {listen: '0.0.0.0:0', allow_public: true, token: ${CORTEX_ADMIN_TOKEN},\n"
            "        allowed_hosts: [127.0.0.1]}\n"
        ),
        prefix=key_prefix,
    )
    runner = Runner(load_project(config), block=0.2)
    await runner.start()
    try:
        base = f"http://127.0.0.1:{runner.admin.bound_port}"
        assert await asyncio.to_thread(_status, f"{base}/healthz") == 200
        bearer = {"Authorization": f"Bearer {token}"}
        assert await asyncio.to_thread(_post, f"{base}/reload", {}) == 401
        assert runner.stats.reload.last_outcome is None
        rebind = {**bearer, "Host": "rebind.example"}
        assert await asyncio.to_thread(_post, f"{base}/reload", rebind) == 403
        assert await asyncio.to_thread(_post, f"{base}/reload", bearer) == 200
        assert runner.stats.reload.last_outcome == "unchanged"
    finally:
        await runner.stop(2)
