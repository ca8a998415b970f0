"""Heartbeats: the runner's own beat, and the watch over every declared agent.

Agents (and runners) publish ``{agent: NAME, ts: EPOCH_MS[, kind: runner]}`` to the
heartbeat stream. An agent silent past its timeout is marked down: metrics and
status show it, the optional ``on_down`` event is published, and the pending
entries of consumers named after it are claimed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cortex_flow.stats import AgentState, RunnerStats
from cortex_flow.topology import Resolved, key_template, render_key

SEED_SCAN = 10_000  # heartbeat entries read back at start to learn the last beats


def beat_fields(name: str, kind: str = "agent", status: str = "ok") -> dict[str, str]:
    return {"agent": name, "kind": kind, "status": status, "ts": str(int(time.time() * 1000))}


def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else ""


class HeartbeatMonitor:
    """Follows the heartbeat stream; calls ``on_down(name)`` when an agent goes silent."""

    def __init__(
        self,
        client: Any,
        resolved: Resolved,
        stats: RunnerStats,
        *,
        runner_interval: float,
        on_down: Callable[[str], None],
        log: logging.Logger,
    ) -> None:
        self.client = client
        self.stats = stats
        self.on_down = on_down
        self.log = log
        self.runner_interval = runner_interval
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.update(resolved)

    def update(self, resolved: Resolved) -> None:
        """Follow a new topology's agents (a reload); known states are kept."""
        self.resolved = resolved
        self.key = resolved.heartbeat_key
        agents = {}
        for name, spec in resolved.agents.items():
            if spec.heartbeat is None:
                continue
            state = self.stats.agents.get(name) or AgentState(name)
            state.timeout = spec.heartbeat.effective_timeout
            agents[name] = state
        self.stats.agents = agents
        self.event_key: str | None = None
        topo = resolved.topology
        if topo.heartbeats is not None and topo.heartbeats.on_down is not None:
            target = topo.streams[topo.heartbeats.on_down.to]
            self.event_key = render_key(target, dict(topo.heartbeats.on_down.vars))
            self.event_maxlen = target.maxlen
        self.runners: dict[str, float] = {}
        self.beat_maxlen: int | None = None
        if topo.heartbeats is not None:
            self.beat_maxlen = topo.streams[topo.heartbeats.stream].maxlen

    async def start(self) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._beat(), name="heartbeat:beat")]
        if self.key is not None:
            self._tasks.append(asyncio.create_task(self._watch(), name="heartbeat:watch"))

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def _beat(self) -> None:
        """The runner's own heartbeat, so other runners can claim for it if it dies."""
        while not self._stop.is_set():
            if self.key is not None:
                with contextlib.suppress(Exception):
                    await self.client.xadd(
                        self.key,
                        beat_fields(self.resolved.runner, "runner"),
                        maxlen=self.beat_maxlen,
                        approximate=True,
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.runner_interval)

    def _seen(self, fields: dict[str, str], entry_id: str) -> None:
        name = fields.get("agent")
        if not name:
            return
        try:
            ts = int(fields["ts"]) / 1000 if "ts" in fields else int(entry_id.split("-")[0]) / 1000
        except ValueError:
            ts = int(entry_id.split("-")[0]) / 1000
        if fields.get("kind") == "runner":
            if name != self.resolved.runner:
                self.runners[name] = max(ts, self.runners.get(name, 0.0))
            return
        state = self.stats.agents.get(name)
        if state is not None and (state.last_beat is None or ts > state.last_beat):
            state.last_beat = ts

    async def _watch(self) -> None:
        assert self.key is not None
        # Not "$": that only sees entries added while XREAD blocks, so a beat arriving
        # between two reads would be missed. An empty seed means an empty stream anyway.
        last_id = "0-0"
        try:
            seed = await self.client.xrevrange(self.key, count=SEED_SCAN)
            for entry_id, fields in reversed(seed):
                self._seen(fields, entry_id)
            if seed:
                last_id = seed[0][0]
        except Exception as exc:
            self.log.warning("heartbeats: cannot read %s yet (%s)", self.key, exc)
        await self._check()
        while not self._stop.is_set():
            try:
                resp = await self.client.xread({self.key: last_id}, count=1000, block=500)
                for _, items in resp or []:
                    for entry_id, fields in items:
                        self._seen(fields, entry_id)
                        last_id = entry_id
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("heartbeats: reading %s failed (%s); retrying", self.key, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)

    async def _check(self) -> None:
        now = time.time()
        for state in self.stats.agents.values():
            if state.last_beat is None:
                continue
            alive = now - state.last_beat <= state.timeout
            if alive and state.up is not True:
                if state.up is False:
                    self.log.info(
                        "agent %s is up again (heartbeat %s ago)",
                        state.name,
                        f"{now - state.last_beat:.1f}s",
                    )
                    await self._event("agent_up", state)
                state.up = True
            elif not alive and state.up is not False:
                state.up = False
                self.log.warning(
                    "agent %s is down: no heartbeat for %.0fs (timeout %gs); claiming its "
                    "pending messages",
                    state.name,
                    now - state.last_beat,
                    state.timeout,
                )
                await self._event("agent_down", state)
                self.on_down(state.name)
        for name, ts in list(self.runners.items()):
            if now - ts > 3 * self.runner_interval:
                self.log.warning("runner %s stopped beating; claiming its pending messages", name)
                del self.runners[name]
                self.on_down(name)

    async def _event(self, kind: str, state: AgentState) -> None:
        if self.event_key is None:
            return
        fields = {
            "type": kind,
            "agent": state.name,
            "last_seen": _iso(state.last_beat),
            "timeout": f"{state.timeout:g}s",
            "runner": self.resolved.runner,
            "at": _iso(time.time()),
        }
        try:
            await self.client.xadd(
                self.event_key, fields, maxlen=self.event_maxlen, approximate=True
            )
        except Exception as exc:
            self.log.warning("heartbeats: cannot publish %s event (%s)", kind, exc)


__all__ = ["HeartbeatMonitor", "beat_fields", "key_template"]
