"""A small client for agents written in Python: send messages, beat, read an inbox.

Names come from the flows, so an agent never spells a Redis key::

    async with Client.from_config("config.yaml", agent="harold") as client:
        beating = asyncio.create_task(client.beat_forever())
        await client.send_task({"type": "batch", "job": "7"}, priority="high")
        async for message in client.inbox():
            async with client.handle(message):   # acknowledged when the block succeeds
                await work(message.msg)

:meth:`Client.inbox` reads as a consumer named after the agent, in the group the flows
declare for its client (``agents.<agent>.inbox``: its ``group``, default the agent's
name), else in the runner group that reads the agent's key; never in a group no flow
declares. On start it first re-reads its own unacknowledged messages; the group's retry,
claim and dead-letter policy applies as in a runner group (:mod:`cortex_flow.ops.inbox`).
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
from cortex_flow.flow.topology import ResolvedGroup, render_key
from cortex_flow.ops.asking import Asking
from cortex_flow.ops.inbox import InboxEntry, InboxReader, reading_group
from cortex_flow.ops.requests import REPLY_IDLE, project_prefix, seconds
from cortex_flow.ops.send import publish
from cortex_flow.ops.tasks import answer
from cortex_flow.wire.access import project_url
from cortex_flow.wire.codec import DecodeError, check_text, decode
from cortex_flow.wire.connection import redis_from_url, wait_for_redis
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
    _reader: InboxReader | None = field(default=None, repr=False, compare=False)
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

    async def fail(self, error: str) -> bool:
        """Handling it failed: it is retried after the backoff for its delivery count, or
        dead-lettered with ``error`` after the group's ``max_deliveries``. False (nothing
        done) for a message not read through :meth:`Client.inbox`."""
        if self._reader is None:
            return False
        await self._reader.failed(InboxEntry(self.id, self.fields, self.deliveries), error)
        return True

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

    ``replicas``: each publish waits (WAIT) until that many replicas hold it and raises
    :class:`~cortex_flow.errors.NotReplicated` otherwise, so no acknowledged publish is
    lost to a failover (publish again on that error; at least once).
    """

    def __init__(
        self,
        project: Project,
        redis: Any,
        agent: str | None = None,
        *,
        owns: bool = False,
        reply_idle: float = REPLY_IDLE,
        replicas: int = 0,
    ) -> None:
        if agent is not None and agent not in project.topology.agents:
            known = ", ".join(sorted(project.topology.agents)) or "none"
            raise CortexFlowError(f'agent "{agent}" is not declared in the flows (agents: {known})')
        self.project = project
        self.redis = redis
        self.agent = agent
        self.replicas = replicas
        self._owns = owns
        self._init_asking(reply_idle)

    @classmethod
    def from_config(
        cls,
        path: str | Path = "config.yaml",
        *,
        agent: str | None = None,
        reply_idle: float = REPLY_IDLE,
        replicas: int = 0,
    ) -> Client:
        """Load the project and connect to its Redis (``embedded``: the running server).

        ``reply_idle``: seconds after its last use that this client's reply stream expires.
        """
        project = load_project(Path(path))
        redis = redis_from_url(project_url(project))
        return cls(project, redis, agent, owns=True, reply_idle=reply_idle, replicas=replicas)

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
        key, spec = self._target(stream, vars, msg)
        life = seconds(ttl, "ttl") if ttl is not None else None
        return await publish(self.redis, key, spec, msg, replicas=self.replicas, ttl=life)

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
        """The group this agent's client reads on its key of ``stream`` (see :meth:`inbox`)."""
        return self._reading(stream, None)[1].name

    def _reading(self, stream: str, group: str | None) -> tuple[str, ResolvedGroup]:
        """The key and the declared group a client of this agent reads; never one that no
        flow declares (``status`` would not show it, ``plan`` would call it drift)."""
        return reading_group(self.project, self._me("read an inbox"), stream, group)

    async def inbox(
        self,
        group: str | None = None,
        stream: str = "inbox",
        *,
        count: int = 10,
        block: float = 5.0,
    ) -> AsyncIterator[Message]:
        """Messages of this agent's inbox, its own unacknowledged ones first, forever.

        Reads as consumer ``agent`` of the group the flows declare for it
        (``agents.<agent>.inbox``: ``inbox.group``, default the agent's name), else of the
        runner group that reads the agent's key; the group is created if ``run`` has not.
        The group's policy applies: a message whose :meth:`handle` block raises is retried
        after its backoff and dead-lettered after ``max_deliveries``; entries idle past
        ``claim_idle`` (an agent process that died) are claimed.
        """
        name = self._me("read an inbox")
        key, resolved = self._reading(stream, group)
        spec = self.project.topology.streams[stream]
        reader = InboxReader(self.redis, resolved, key, name, log=log)
        await reader.start()
        while True:
            for entry in await reader.next(count, block):
                try:
                    check_text(entry.fields)
                except DecodeError as exc:  # never yielded: dead-lettered with its bytes
                    await reader.give_up(entry, f"cannot decode: {exc}")
                    continue
                yield Message(
                    entry.id,
                    entry.fields,
                    key,
                    entry.deliveries,
                    resolved.name,
                    spec.codec,
                    self.redis,
                    reader,
                    project_prefix(self.project),
                )

    @contextlib.asynccontextmanager
    async def handle(self, message: Message) -> AsyncIterator[Message]:
        """Acknowledge ``message`` when the block succeeds.

        When it raises, the exception is logged and not re-raised: the message is retried
        after the backoff for its delivery count, and dead-lettered with the error
        (``"ValueError: ..."``) as ``dlq_error`` after the group's ``max_deliveries``
        (a message not from :meth:`inbox` stays pending and the exception propagates).
        """
        try:
            yield message
        except Exception as exc:
            if not await message.fail(f"{type(exc).__name__}: {exc}"):
                raise
            return
        await message.ack()
