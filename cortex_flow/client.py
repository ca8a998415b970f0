"""A small client for agents written in Python: send messages, beat, read an inbox.

Names come from the flows, so an agent never spells a Redis key::

    async with Client.from_config("config.yaml", agent="harold") as client:
        beating = asyncio.create_task(client.beat_forever())
        await client.send_task({"type": "batch", "job": "7"}, priority="high")
        async for message in client.inbox():
            async with client.handle(message):   # acknowledged when the block succeeds
                await work(message.msg)

:meth:`Client.inbox` reads as a consumer named after the agent, in the group the flows
declare on the agent's inbox (else a group named after the agent). Sharing the runner's
group is what lets the runner take over the agent's unacknowledged messages when its
heartbeats stop. On start it first re-reads its own unacknowledged messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from redis.exceptions import RedisError

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.loader import Project, load_project
from cortex_flow.flow.topology import render_key, resolve
from cortex_flow.ops.asking import Asking
from cortex_flow.ops.requests import REPLY_IDLE, project_prefix, publish_with_ttl, seconds
from cortex_flow.ops.send import publish, target_key
from cortex_flow.ops.tasks import answer
from cortex_flow.wire.access import project_url
from cortex_flow.wire.codec import decode
from cortex_flow.wire.connection import redis_from_url, wait_for_redis
from cortex_flow.wire.groups import ensure_group
from cortex_flow.wire.heartbeats import beat_fields, encode_beat
from cortex_flow.wire.replies import FIELDS as REQUEST_FIELDS
from cortex_flow.wire.replies import REPLY

__all__ = ["Client", "Message"]


log = logging.getLogger("cortex_flow.client")


@dataclass
class Message:
    """One inbox entry. ``fields`` as stored; ``msg`` decoded with the stream's codec."""

    id: str
    fields: dict[str, str]
    stream: str  # the Redis key it was read from
    deliveries: int
    group: str
    codec: str = "raw"
    _redis: Any = field(default=None, repr=False, compare=False)
    _prefix: str = field(default="cf:", repr=False, compare=False)

    @property
    def msg(self) -> Any:
        """The message: the fields (raw codec) or the decoded JSON object (json codec);
        a request's own fields (``cf_*``) left out."""
        msg = decode(self.codec, self.fields)
        if self.codec == "raw":
            for name in REQUEST_FIELDS:
                msg.pop(name, None)
        return msg

    @property
    def is_request(self) -> bool:
        """Whether its sender waits for a reply (:meth:`reply`)."""
        return REPLY in self.fields

    async def ack(self) -> None:
        """Acknowledge it (XACK): it is done and will not be delivered again."""
        await self._redis.xack(self.stream, self.group, self.id)

    async def reply(self, value: Any) -> None:
        """Answer a request with ``value`` (JSON) and acknowledge it, in one step."""
        await answer(
            self._redis,
            self._prefix,
            key=self.stream,
            group=self.group,
            entry_id=self.id,
            fields=self.fields,
            deliveries=self.deliveries,
            value=value,
        )


class Client(Asking):
    """Sends, asks, beats and reads for one project; ``agent`` names who is speaking.

    Asking (``request``, ``stream``, ``cancel``, ``task``): :mod:`cortex_flow.ops.asking`.
    """

    def __init__(
        self,
        project: Project,
        redis: Any,
        agent: str | None = None,
        *,
        owns: bool = False,
        reply_idle: float = REPLY_IDLE,
    ) -> None:
        if agent is not None and agent not in project.topology.agents:
            known = ", ".join(sorted(project.topology.agents)) or "none"
            raise CortexFlowError(f'agent "{agent}" is not declared in the flows (agents: {known})')
        self.project = project
        self.redis = redis
        self.agent = agent
        self._owns = owns
        self._init_asking(reply_idle)

    @classmethod
    def from_config(
        cls,
        path: str | Path = "config.yaml",
        *,
        agent: str | None = None,
        reply_idle: float = REPLY_IDLE,
    ) -> Client:
        """Load the project and connect to its Redis (``embedded``: the running server).

        ``reply_idle``: seconds after its last use that this client's reply stream expires.
        """
        project = load_project(Path(path))
        redis = redis_from_url(project_url(project))
        return cls(project, redis, agent, owns=True, reply_idle=reply_idle)

    async def __aenter__(self) -> Self:
        await wait_for_redis(self.redis, timeout=5.0, log=log)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (when :meth:`from_config` opened it)."""
        await self._close_asking()
        if self._owns:
            await self.redis.aclose()

    def _me(self, doing: str) -> str:
        if self.agent is None:
            raise CortexFlowError(f"give the client an agent to {doing}: Client(..., agent=NAME)")
        return self.agent

    # -- sending -------------------------------------------------------------------------

    async def publish(
        self, stream: str, msg: Mapping[str, Any], *, ttl: float | str | None = None, **vars: str
    ) -> str:
        """Publish to a declared stream; ``vars`` pick the key (priority, agent...).

        ``ttl`` (seconds or ``"30s"``) sets a deadline: read later, it is not handled.
        """
        key, spec = self._target(stream, vars)
        if ttl is None:
            return await publish(self.redis, key, spec, msg)
        return await publish_with_ttl(self.redis, key, spec, msg, seconds(ttl, "ttl"))

    async def send_task(
        self,
        msg: Mapping[str, Any],
        priority: str = "normal",
        stream: str = "tasks",
        *,
        ttl: float | str | None = None,
    ) -> str:
        """Queue a task at a priority; returns the entry ID."""
        return await self.publish(stream, msg, priority=priority, ttl=ttl)

    async def send_to(
        self,
        agent: str,
        msg: Mapping[str, Any],
        stream: str = "inbox",
        *,
        ttl: float | str | None = None,
    ) -> str:
        """Send a direct message to one agent's inbox; returns the entry ID."""
        return await self.publish(stream, msg, agent=agent, ttl=ttl)

    # -- heartbeats ------------------------------------------------------------------------

    async def heartbeat(self, status: str = "ok") -> str:
        """Publish one heartbeat (``agent``, ``kind=agent``, ``status``, ``ts`` in ms)."""
        name = self._me("send heartbeats")
        topo = self.project.topology
        if topo.heartbeats is None:
            raise CortexFlowError("the flows declare no heartbeats: {stream: ...}; add one")
        spec = topo.streams[topo.heartbeats.stream]
        entry_id: str = await self.redis.xadd(
            render_key(spec, {}),
            encode_beat(spec.codec, beat_fields(name, "agent", status)),
            maxlen=spec.maxlen,
            approximate=True,
        )
        return entry_id

    async def beat_forever(self, interval: float | None = None) -> None:
        """Beat every ``interval`` seconds (default: the agent's declared interval) until
        cancelled; a failed beat is logged and the next one tried."""
        name = self._me("send heartbeats")
        if interval is None:
            policy = self.project.topology.agents[name].heartbeat
            if policy is None:
                raise CortexFlowError(
                    f"agent {name} declares no heartbeat interval; add heartbeat: "
                    "{interval: 10s} to it in the flows, or pass interval="
                )
            interval = policy.interval
        while True:
            try:
                await self.heartbeat()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat of %s failed (%s); trying again in %gs", name, exc, interval)
            await asyncio.sleep(interval)

    # -- reading -----------------------------------------------------------------------------

    def inbox_group(self, stream: str = "inbox") -> str:
        """The group the flows declare on this agent's key of ``stream``, else the agent."""
        name = self._me("read an inbox")
        key, _ = target_key(self.project, stream, agent=name)
        resolved = resolve(self.project.topology, name)
        declared = sorted(
            g.name for g in resolved.groups.values() if key in {k.key for k in g.keys}
        )
        return declared[0] if declared else name

    async def inbox(
        self,
        group: str | None = None,
        stream: str = "inbox",
        *,
        count: int = 10,
        block: float = 5.0,
    ) -> AsyncIterator[Message]:
        """Messages of this agent's inbox, its own unacknowledged ones first, forever.

        Reads as consumer ``agent`` of ``group`` (see :meth:`inbox_group`), creating the
        group if missing. Acknowledge each with ``await message.ack()`` or
        ``async with client.handle(message)``.
        """
        name = self._me("read an inbox")
        key, spec = target_key(self.project, stream, agent=name)
        group = group or self.inbox_group(stream)
        await ensure_group(self.redis, key, group, "earliest")
        cursor = "0"  # our own pending entries first (after a restart), then new ones
        while True:
            block_ms = None if cursor != ">" else int(block * 1000)
            reply = await self.redis.xreadgroup(
                group, name, {key: cursor}, count=count, block=block_ms
            )
            entries = reply[0][1] if reply else []
            if cursor != ">" and not entries:
                cursor = ">"
                continue
            counts: dict[str, int] = {}
            if cursor != ">" and entries:
                rows = await self.redis.xpending_range(
                    key, group, entries[0][0], entries[-1][0], len(entries), consumername=name
                )
                counts = {r["message_id"]: int(r["times_delivered"]) for r in rows}
                cursor = entries[-1][0]
            for entry_id, fields in entries:
                if not fields:  # trimmed or deleted while pending: nothing left to handle
                    await self.redis.xack(key, group, entry_id)
                    continue
                yield Message(
                    entry_id,
                    dict(fields),
                    key,
                    counts.get(entry_id, 1),
                    group,
                    spec.codec,
                    self.redis,
                    project_prefix(self.project),
                )

    @contextlib.asynccontextmanager
    async def handle(self, message: Message) -> AsyncIterator[Message]:
        """Acknowledge ``message`` when the block succeeds; on an exception it stays pending
        (redelivered after a restart, or claimed by the runner) and the exception propagates."""
        yield message
        await message.ack()
