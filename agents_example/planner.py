"""Planner: an agent in a process of its own, reading its inbox with ``cortex_flow.Client``.

Start it next to the runner (``make run`` in another terminal)::

    .venv/bin/python -m agents_example.planner

With ``redis.url: embedded`` it finds the runner's server through ``.cortex/``; otherwise
set ``CORTEX_REDIS_URL``. It beats every 10s (``agents.planner.heartbeat``) and reads group
``planner`` on ``cortex:messages:planner`` (``agents.planner.inbox``). A message without
``goal`` raises inside ``client.handle``: it is retried after 1s and 2s, then
dead-lettered with that reason (``cortex-flow dlq list``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cortex_flow import Client

log = logging.getLogger("agents_example.planner")


async def plan(msg: Mapping[str, Any]) -> None:
    """Plan a goal; a message without one is malformed (raising: retried, then a DLQ)."""
    if not msg.get("goal"):
        raise ValueError("message to planner has no goal field")
    log.info("planner planned %s", msg["goal"])


async def main(config: str | Path = "config.yaml") -> None:
    """Beat and handle planner's inbox until cancelled."""
    async with Client.from_config(config, agent="planner") as client:
        beating = asyncio.create_task(client.beat_forever())
        try:
            async for message in client.inbox():
                async with client.handle(message):  # acknowledged when the block succeeds
                    await plan(message.msg)
        finally:
            beating.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "config.yaml"))
