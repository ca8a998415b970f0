"""Redis Sentinel: the runner finds the master through a sentinel and routes as usual."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis
from projects import make_project, module, running, wait_for, write_module
from redis_servers import PrivateRedis, PrivateSentinel

FLOWS = """
version: 1
streams:
  jobs: {key: "jobs"}
  done: {key: "done"}
groups:
  workers:
    stream: jobs
    routes:
      - call: {function: "{M}:handle", inline: true}
        continue: true
      - to: done
"""


async def test_runner_connects_through_a_sentinel(tmp_path: Path) -> None:
    """A redis+sentinel:// URL reaches the monitored master; messages are handled and acked."""
    master = PrivateRedis(tmp_path / "master").start()
    sentinel = PrivateSentinel(tmp_path / "sentinel", master).start()
    client = aioredis.Redis(port=master.port, decode_responses=True)
    try:
        mod = write_module(tmp_path, "seen = []\ndef handle(msg):\n    seen.append(msg['n'])\n")
        config = make_project(tmp_path, FLOWS.replace("{M}", mod), url=sentinel.url, mod=mod)
        async with running(config):
            for n in range(10):
                await client.xadd("jobs", {"n": str(n)})
            await wait_for(lambda: len(module(mod).seen) == 10, 15, "10 messages handled")

            async def published() -> bool:
                return await client.xlen("done") == 10

            await wait_for(published, 5, "all 10 published to done")
            assert (await client.xpending("jobs", "workers"))["pending"] == 0
    finally:
        await client.aclose()
        sentinel.stop()
        master.stop()
