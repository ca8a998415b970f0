"""A group over a partitioned stream: one consumer per partition, under one name.

Each partition's keys share a hash slot, so its consumer waits on them in one blocking
read and commits atomically, wherever the partition lies in a cluster. Every runner
reads every partition through the consumer group (the entries of one partition are
shared out among the runners as on any stream); a partition key's messages all sit in
one partition, in publish order.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.topology import ResolvedGroup, partitions_of
from cortex_flow.runtime.consumer import GroupConsumer
from cortex_flow.runtime.routes import RouteTable
from cortex_flow.runtime.stats import GroupStats


class PartitionedConsumer:
    """The consumers of one group's partitions, started, stopped and reloaded together."""

    def __init__(
        self,
        client: Any,
        group: ResolvedGroup,
        table: RouteTable,
        streams: Mapping[str, StreamSpec],
        stats: GroupStats,
        **options: Any,
    ) -> None:
        self.group = group
        self.name = group.name
        self.keys = list(group.keys)
        self.parts = [
            GroupConsumer(
                client, dataclasses.replace(group, keys=part), table, streams, stats, **options
            )
            for part in partitions_of(group.keys)
        ]
        shared = self.parts[0].faults  # a failover is said once for the group, not N times
        for part in self.parts[1:]:
            part.faults = shared
        self.done = asyncio.Event()  # set when every partition's consumer is done
        self._watch: asyncio.Task[None] | None = None

    @property
    def table(self) -> RouteTable:
        return self.parts[0].table

    @property
    def http(self) -> Any:
        return self.parts[0].http

    @http.setter
    def http(self, http: Any) -> None:
        for part in self.parts:
            part.http = http

    @property
    def held(self) -> int:
        return sum(part.held for part in self.parts)

    def start(self) -> asyncio.Task[None]:
        for part in self.parts:
            part.start()
        self._watch = asyncio.create_task(self._all_done(), name=f"partitions:{self.name}")
        return self._watch

    async def _all_done(self) -> None:
        await asyncio.gather(*(part.done.wait() for part in self.parts))
        self.done.set()

    def swap_routes(self, table: RouteTable) -> None:
        for part in self.parts:
            part.swap_routes(table)

    def request_claim(self, consumers: Iterable[str]) -> None:
        names = list(consumers)
        for part in self.parts:
            part.request_claim(names)

    async def stop(self, grace: float) -> bool:
        results = await asyncio.gather(*(part.stop(grace) for part in self.parts))
        if self._watch is None:
            self.done.set()
        else:
            await self._watch
        return all(results)


Consumer = GroupConsumer | PartitionedConsumer


def make_consumer(
    client: Any,
    group: ResolvedGroup,
    table: RouteTable,
    streams: Mapping[str, StreamSpec],
    stats: GroupStats,
    **options: Any,
) -> Consumer:
    """A :class:`PartitionedConsumer` for a group over partitions, else a GroupConsumer."""
    if any(k.partition is not None for k in group.keys):
        return PartitionedConsumer(client, group, table, streams, stats, **options)
    return GroupConsumer(client, group, table, streams, stats, **options)
