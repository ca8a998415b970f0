"""The ``agents`` duty: one ``agent_down`` / ``agent_up`` event per transition.

Every runner watches the beats and knows which agents are up
(:mod:`cortex_flow.runtime.heartbeat`); only the runner holding the ``agents`` duty
(:mod:`cortex_flow.runtime.duties`) publishes. It records each agent's state in Redis
next to the event stream and publishes in the same fenced script only when the
recorded state differs (:func:`cortex_flow.wire.heartbeats.record_transition`), so a
transition gives one event whichever runner saw it first, and across a takeover.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from cortex_flow.flow.topology import Resolved, render_key
from cortex_flow.runtime.duties import AGENTS_DUTY, Duties
from cortex_flow.runtime.stats import AgentState
from cortex_flow.wire.codec import encode
from cortex_flow.wire.duties import LeaseLost
from cortex_flow.wire.heartbeats import record_transition


def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else ""


class AgentEvents:
    """Publishes agent transitions while this runner holds the ``agents`` duty."""

    def __init__(self, client: Any, duties: Duties | None, log: logging.Logger) -> None:
        self.client = client
        self.duties = duties
        self.log = log
        self.runner = ""
        self.key: str | None = None  # the event stream's key; None: no on_down events
        self.codec = "raw"
        self._recorded: dict[str, bool] = {}  # agent states known to be recorded in Redis

    def update(self, resolved: Resolved) -> None:
        """Follow the flows' ``heartbeats.on_down`` target (start and reloads)."""
        self.runner = resolved.runner
        key, codec = None, "raw"
        topo = resolved.topology
        if topo.heartbeats is not None and topo.heartbeats.on_down is not None:
            target = topo.streams[topo.heartbeats.on_down.to]
            key, codec = render_key(target, dict(topo.heartbeats.on_down.vars)), target.codec
        if key != self.key:
            self._recorded = {}  # another stream: its recorded states are learnt again
        self.key, self.codec = key, codec

    def duty_changed(self, held: bool) -> None:
        """The duty came or went: what is recorded in Redis is learnt again."""
        self._recorded = {}

    async def publish(self, agents: Iterable[AgentState]) -> None:
        """As holder of the duty, record each known state and publish the transitions."""
        if self.key is None or self.duties is None:
            return
        fence = self.duties.fence(AGENTS_DUTY)
        if fence is None:
            return
        for state in agents:
            if state.up is None or self._recorded.get(state.name) is state.up:
                continue
            kind = "agent_up" if state.up else "agent_down"
            fields = {
                "type": kind,
                "agent": state.name,
                "last_seen": _iso(state.last_beat),
                "timeout": f"{state.timeout:g}s",
                "runner": self.runner,
                "at": _iso(time.time()),
            }
            entry = encode(self.codec, fields)
            try:
                await record_transition(self.client, fence, self.key, state.name, state.up, entry)
            except LeaseLost:
                self.duties.lost(AGENTS_DUTY)
                return
            except Exception as exc:
                self.log.warning("heartbeats: cannot publish %s event (%s)", kind, exc)
                return
            self._recorded[state.name] = state.up


__all__ = ["AgentEvents"]
