"""Benchmark: what an idle runner sends to Redis, at 1, 100 and 1,000 agent inboxes.

Each agent has an inbox (``cortex:messages:{{ agent }}``) read by a group of its own, as
the example flows do. The runner starts, settles for five seconds, then the Redis
server's ``INFO commandstats`` is read before and after ``seconds`` of idling; the figure
is every command counted meanwhile (the two INFO calls excepted), per second. Target: at
most 1 command a second per idle group; the baseline column is that target (one command
a second per group). Before issue 11, one idle runner with 1,000 inboxes sent 2,416/s.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import redis

from bench.common import Figure, Server, project
from cortex_flow.runtime.runner import Runner

SIZES = (1, 100, 1000)
SETTLE = 5.0  # past every group's first (short) wait


def inbox_flow(agents: int) -> str:
    """``agents`` agents, their inboxes, one group per inbox with a noop call."""
    lines = ["version: 1", "agents:"]
    lines += [f"  a{i}: {{}}" for i in range(agents)]
    lines += ["streams:", "  inbox:", '    key: "cortex:messages:{{ agent }}"', "groups:"]
    for i in range(agents):
        lines += [
            f"  inbox-a{i}:",
            "    stream: inbox",
            f"    vars: {{agent: a{i}}}",
            "    routes:",
            "      - call: bench.handlers:noop",
        ]
    return "\n".join(lines) + "\n"


def calls(client: redis.Redis) -> Counter[str]:
    """Commands served so far, by name."""
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


async def idle_rate(server: Server, agents: int, seconds: float) -> tuple[float, Counter[str]]:
    """Commands per second of one idle runner over ``agents`` inboxes, and by command."""
    with project(server, inbox_flow(agents)) as proj:
        runner = Runner(proj, admin=False)
        await runner.start()
        client = server.client()
        try:
            await asyncio.sleep(SETTLE)
            before = calls(client)
            await asyncio.sleep(seconds)
            after = calls(client)
        finally:
            client.close()
            await runner.stop(grace=10)
    sent = after - before
    sent["info"] -= 1  # the INFO that read ``before``
    sent = +sent
    return sum(sent.values()) / seconds, sent


def run(server: Server, seconds: float) -> list[Figure]:
    figures = []
    for agents in SIZES:
        server.flush()
        rate, sent = asyncio.run(idle_rate(server, agents, seconds))
        top = ", ".join(f"{name} {n / seconds:.1f}" for name, n in sent.most_common(3))
        figures.append(
            Figure(
                "idle",
                f"commands/s, {agents:,} idle inbox group{'s' if agents > 1 else ''}",
                rate,
                "1/s per group",
                float(agents),
                "<= 1/s per group",
                rate <= agents,
                note=f"{agents:,} groups: {top} (over {seconds:g}s)",
            )
        )
    return figures
