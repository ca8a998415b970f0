"""Groups an agent's client reads (``agents.X.inbox``) through start and reload: the runner
creates them and never consumes from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from reload_helpers import FlowProject, edit, running, wait_for

from cortex_flow.flow.topology import no_reader


async def test_inbox_groups_are_created_on_reload_and_never_read_by_the_runner(
    tmp_path: Path,
    key_prefix: str,
    redis_url: str,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An agent given inbox: on reload gets its group (the runner routes to its key but
    starts no consumer there); a policy change and the agent's removal apply too. An
    agent added without any reader is warned about, with what to add."""
    project = FlowProject(tmp_path, key_prefix, redis_url)
    del project.groups["inboxes"]  # the runner reads no inbox here; agents' clients do
    key = f"{key_prefix}messages:scout"
    async with running(project) as (runner, watcher):
        caplog.clear()
        project.agents["scout"] = {"inbox": {"dead_letter": "dlq"}}
        project.agents["lonely"] = None
        assert await edit(project, runner, watcher) == "applied"
        warned = [r.getMessage() for r in caplog.records if "nothing reads" in r.getMessage()]
        assert warned == [no_reader("lonely", [f"{key_prefix}messages:lonely"])]
        assert "scout" not in runner.running.consumers
        [group] = await redis_client.xinfo_groups(key)
        assert (group["name"], group["consumers"]) == ("scout", 0)
        await redis_client.xadd(f"{key_prefix}tasks:high", {"to": "scout", "text": "hi"})
        await wait_for(lambda: redis_client.xlen(key), what="the message routed to scout")
        [group] = await redis_client.xinfo_groups(key)
        assert (group["pending"], group["consumers"]) == (0, 0)  # left for scout's client

        project.agents["scout"]["inbox"]["retry"] = {"max_deliveries": 2}
        assert await edit(project, runner, watcher) == "applied"
        assert "group scout: retry.max_deliveries 5 -> 2" in runner.stats.reload.last_changes
        assert "scout" not in runner.running.consumers

        del project.agents["scout"]
        assert await edit(project, runner, watcher) == "applied"
        assert set(runner.running.consumers) == {"agents"}
