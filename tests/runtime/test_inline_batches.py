"""Inline batches: plain acknowledgements ride with the next read, held as whole runs.

Counted by id on a real server: every entry ran once, was acknowledged once and is
counted once, whether its XACK went in the read's pipeline or, refused there, through
the outbox.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from projects import NewProject, module, none_pending, running, wait_for
from redis.exceptions import ResponseError

from cortex_flow.flow.callables import importable_from
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.topology import StreamKey, resolve
from cortex_flow.runtime.consumer import GroupConsumer
from cortex_flow.runtime.delivery import Acks, Entry, Held
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.stats import GroupStats
from cortex_flow.wire.groups import ensure_group

FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
    groups:
      work:
        stream: jobs
        batch: 20
        routes:
          - call: {function: "{M}:seen", inline: true}
"""

HANDLERS = """
    ran = []

    def seen(msg):
        ran.append(msg["n"])

    async def aseen(msg):
        ran.append(msg["n"])
"""

# an async call, at most 10 at once: a read of 20 waits for the batch to end
ASYNC_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs"}
    groups:
      work:
        stream: jobs
        batch: 20
        concurrency: 10
        routes:
          - call: "{M}:aseen"
"""


class _Counting:
    """The client, counting XACKs sent on their own (not in a pipeline with a read);
    ``refuse`` XACK replies in pipelines are turned into a passing error."""

    def __init__(self, client: Any, refuse: int = 0) -> None:
        self._client = client
        self.lone_xacks = 0
        self.refuse = refuse
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def xack(self, *args: Any) -> Any:
        self.lone_xacks += 1
        return await self._client.xack(*args)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        return _Pipeline(self, self._client.pipeline(*args, **kwargs))


class _Pipeline:
    def __init__(self, owner: _Counting, pipe: Any) -> None:
        self._owner = owner
        self._pipe = pipe
        self._names: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._pipe, name)

        def queued(*args: Any, **kwargs: Any) -> Any:
            self._names.append(name)
            return method(*args, **kwargs)

        return queued

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        replies: list[Any] = await self._pipe.execute(raise_on_error=raise_on_error)
        owner = self._owner
        for i, name in enumerate(self._names):
            if name == "xack" and owner.refused < owner.refuse:
                owner.refused += 1  # applied, but said to be refused: committed again
                replies[i] = ResponseError("READONLY You can't write against a read only replica.")
        return replies


async def _consume(
    new_project: NewProject,
    redis_client: Any,
    key_prefix: str,
    client: Any,
    n: int,
    flow: str = FLOW,
) -> tuple[GroupConsumer, str]:
    config, mod = new_project(flow, HANDLERS)
    project = load_project(config)
    resolved = resolve(project.topology, "t1")
    group = resolved.groups["work"]
    streams = {name: s.spec for name, s in resolved.streams.items()}
    with importable_from(project.base_dir):
        table = RouteTable(group, streams, frozenset())
    key = f"{key_prefix}jobs"
    await ensure_group(redis_client, key, "work", "earliest")
    for i in range(n):
        await redis_client.xadd(key, {"n": str(i)})
    stats = GroupStats("work", "t1")
    consumer = GroupConsumer(client, group, table, streams, stats, block=0.05)
    consumer.start()
    try:
        await wait_for(lambda: stats.keys[key].processed >= n, what=f"{n} processed")
        await wait_for(lambda: none_pending(redis_client, key, "work"), what="all acked")
    finally:
        assert await consumer.stop(5.0)
    assert stats.keys[key].processed == n
    assert consumer.held == 0
    return consumer, mod


async def test_acknowledgements_go_with_the_next_read(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """Batches of an inline table are acknowledged in the read's pipeline, not on their own."""
    client = _Counting(redis_client)
    _, mod = await _consume(new_project, redis_client, key_prefix, client, 200)
    assert Counter(module(mod).ran) == Counter(str(i) for i in range(200))
    # the last batch has no read after it: committed on its own, like any idle moment's
    assert client.lone_xacks <= 2, client.lone_xacks


async def test_acknowledgements_of_async_calls_go_with_the_read_that_waited_for_them(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """A batch of async calls that ends while the consumer waits for room is acknowledged
    in the pipeline of the read that follows."""
    client = _Counting(redis_client)
    _, mod = await _consume(new_project, redis_client, key_prefix, client, 200, ASYNC_FLOW)
    assert Counter(module(mod).ran) == Counter(str(i) for i in range(200))
    assert client.lone_xacks <= 3, client.lone_xacks  # of 10 batches


async def test_an_acknowledgement_refused_in_the_pipeline_is_committed_by_the_outbox(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """An XACK reply that is an error (a passing refusal) is committed again, counted once."""
    client = _Counting(redis_client, refuse=2)
    _, mod = await _consume(new_project, redis_client, key_prefix, client, 100)
    assert client.refused == 2
    assert client.lone_xacks >= 1  # the refused ones, again through the outbox
    assert Counter(module(mod).ran) == Counter(str(i) for i in range(100))


WEIGHTED_FLOW = """
    version: 1
    streams:
      jobs: {key: "{P}jobs:{{ priority }}", priorities: [high, low]}
    groups:
      work:
        stream: jobs
        batch: 20
        priority: weighted
        weights: {high: 3, low: 1}
        routes:
          - call: {function: "{M}:seen", inline: true}
"""


async def test_weighted_reads_leave_acknowledgements_to_the_outbox(
    new_project: NewProject, redis_client: Any, key_prefix: str
) -> None:
    """Weighted reads cannot carry acknowledgements: the outbox commits them, each once."""
    config, mod = new_project(WEIGHTED_FLOW, HANDLERS)
    for level in ("high", "low"):
        for i in range(60):
            await redis_client.xadd(f"{key_prefix}jobs:{level}", {"n": f"{level}{i}"})
    async with running(config) as runner:
        stats = runner.stats.groups["work"].keys
        for level in ("high", "low"):
            key = f"{key_prefix}jobs:{level}"
            await wait_for(lambda k=key: stats[k].processed == 60, what=f"{level} processed")
            await wait_for(lambda k=key: none_pending(redis_client, k, "work"), what="acked")
    expected = [f"{level}{i}" for level in ("high", "low") for i in range(60)]
    assert Counter(module(mod).ran) == Counter(expected)


def test_held_counts_whole_runs_of_acknowledgements() -> None:
    """Held: a run of acknowledgements is one entry in, its (key, id) all members."""
    key = StreamKey("jobs", "k")
    entries = [Entry(key, f"1-{i}", {}, 1) for i in range(3)]
    held = Held()
    held.add(("other", "9-0"))
    ack = Acks("k", entries)
    held.hold(ack)
    assert len(held) == 4 and held
    assert ("k", "1-2") in held and ("other", "9-0") in held
    assert ("k", "1-3") not in held and ("other", "1-0") not in held
    assert sorted(held) == [("k", "1-0"), ("k", "1-1"), ("k", "1-2"), ("other", "9-0")]
    held.release(ack)
    held.release(ack)  # twice: no effect
    held.discard(("other", "9-0"))
    assert len(held) == 0 and not held and ("k", "1-0") not in held
