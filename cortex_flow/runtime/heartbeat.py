"""Heartbeats: the runner's own beat, and the watch over every declared agent.

Agents (and runners) publish ``{agent: NAME, ts: EPOCH_MS[, kind: runner]}`` to the
heartbeat stream; a runner's beats also carry ``instance`` (``host:pid:start_ms``), so a
second process started under the same runner name is refused at start. An agent silent
past its timeout is marked down: metrics and status show it, the optional ``on_down``
event is published, and the pending entries of consumers named after it are claimed at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.topology import Resolved, key_template, render_key
from cortex_flow.runtime.stats import AgentState, RunnerStats
from cortex_flow.wire.codec import DecodeError, decode, encode
from cortex_flow.wire.entryids import id_ms

SEED_SCAN = 10_000  # heartbeat entries read back at start to learn the last beats
WARN_EVERY = 60.0  # a failing beat of the runner's own is logged at most this often
STOP_BEAT_TIMEOUT = 1.0  # the last ("stopped") beat must not hold up a shutdown
RUNNER_SILENCE = 3  # a runner silent for this many of its intervals is down


def beat_fields(
    name: str, kind: str = "agent", status: str = "ok", instance: str | None = None
) -> dict[str, str]:
    """A heartbeat entry; a runner's carries its ``instance`` (``host:pid:start_ms``)."""
    fields = {"agent": name, "kind": kind, "status": status, "ts": str(int(time.time() * 1000))}
    if instance is not None:
        fields["instance"] = instance
    return fields


def runner_instance(started_at: float | None = None) -> str:
    """``host:pid:start_ms``: tells two processes using one runner name apart."""
    started = time.time() if started_at is None else started_at
    return f"{socket.gethostname()}:{os.getpid()}:{int(started * 1000)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: it exists
    return True


def _earlier_self(instance: str) -> bool:
    """Whether ``instance`` is an earlier run of this process's slot on this host.

    The same host with a pid that is gone (a restart) or that is ours (a restarted
    container, where the runner is pid 1 again) is not another runner.
    """
    host, _, rest = instance.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    return pid == os.getpid() or not _pid_alive(pid)


def _fields(codec: str, fields: Mapping[str, Any]) -> dict[str, Any] | None:
    """A heartbeat entry's fields, decoded with the stream's codec; None if not a beat.

    A raw entry in a ``codec: json`` stream (an agent that beats with plain fields) is
    still read as a beat.
    """
    if codec != "raw":
        try:
            return dict(decode(codec, dict(fields)))
        except DecodeError:
            pass
    return dict(fields) if "agent" in fields else None


def _timestamp(fields: Mapping[str, Any], entry_id: str) -> float:
    try:
        return int(fields["ts"]) / 1000
    except (KeyError, TypeError, ValueError):
        return id_ms(entry_id) / 1000


async def check_runner_name(
    client: Any,
    key: str,
    *,
    name: str,
    instance: str,
    interval: float,
    codec: str = "raw",
) -> None:
    """Refuse to start when another live runner beats under ``name``.

    Two runners with one name share consumer names: each would read, acknowledge and
    claim the other's pending entries as its own. A beat within ``RUNNER_SILENCE`` x
    ``interval`` from another instance is taken as a live runner, unless it said it
    stopped or it is an earlier run of this process on this host.
    """
    window = RUNNER_SILENCE * interval
    now = time.time()
    # entry IDs are the server's clock, the ``ts`` field the beating runner's: read
    # twice the window back, then judge by ``ts``
    since = max(0, int((now - 2 * window) * 1000))
    entries = await client.xrevrange(key, "+", f"{since}-0", count=SEED_SCAN)
    latest: dict[str, tuple[float, dict[str, Any]]] = {}
    for entry_id, raw in entries:
        fields = _fields(codec, raw)
        if fields is None or fields.get("kind") != "runner" or str(fields.get("agent")) != name:
            continue
        other = str(fields.get("instance") or "")
        if not other or other == instance or other in latest:
            continue  # an older runner without instances, ourselves, or an older beat
        latest[other] = (_timestamp(fields, entry_id), fields)
    for other, (ts, fields) in latest.items():
        age = now - ts
        if age > window or fields.get("status") == "stopped" or _earlier_self(other):
            continue
        host, _, rest = other.partition(":")
        pid = rest.partition(":")[0]
        raise CortexFlowError(
            f"runner.name {name} is already used by another runner (host {host} pid {pid}, "
            f"beat {max(age, 0):.0f}s ago); give each runner its own name"
        )


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
        instance: str | None = None,
    ) -> None:
        self.client = client
        self.stats = stats
        self.on_down = on_down
        self.log = log
        self.runner_interval = runner_interval
        self.instance = instance or runner_instance()
        self.key: str | None = None
        self.runners: dict[str, float] = {}  # other runners' last beats, kept across reloads
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ending: set[asyncio.Task[None]] = set()  # cancelled by a reload, not yet done
        self._beat_failed_at: float | None = None  # when a failed beat was last logged
        self._twin_warned_at: float | None = None
        self.update(resolved)

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def update(self, resolved: Resolved) -> bool:
        """Follow a new topology (a reload); known states are kept.

        When the heartbeat stream's key changed, the beat and watch tasks are restarted on
        the new key (or the watch ends, when heartbeats were removed); returns whether so.
        """
        self.resolved = resolved
        agents = {}
        for name, spec in resolved.agents.items():
            if spec.heartbeat is None:
                continue
            state = self.stats.agents.get(name) or AgentState(name)
            state.timeout = spec.heartbeat.effective_timeout
            agents[name] = state
        self.stats.agents = agents
        self.event_key: str | None = None
        self.event_codec = "raw"
        self.event_maxlen: int | None = None
        topo = resolved.topology
        if topo.heartbeats is not None and topo.heartbeats.on_down is not None:
            target = topo.streams[topo.heartbeats.on_down.to]
            self.event_key = render_key(target, dict(topo.heartbeats.on_down.vars))
            self.event_maxlen = target.maxlen
            self.event_codec = target.codec
        self.beat_maxlen: int | None = None
        self.beat_codec = "raw"
        if topo.heartbeats is not None:
            beats = topo.streams[topo.heartbeats.stream]
            self.beat_maxlen, self.beat_codec = beats.maxlen, beats.codec
        changed = resolved.heartbeat_key != self.key
        self.key = resolved.heartbeat_key
        if changed:
            # other runners are known by their beats on the old stream; on the new one
            # they are learnt again, instead of being declared down for beating elsewhere
            self.runners = {}
            if self.running:
                self._restart()
        return changed

    async def start(self) -> None:
        self._stop.clear()
        self._spawn()

    def _spawn(self) -> None:
        self._tasks = [asyncio.create_task(self._beat(), name="heartbeat:beat")]
        if self.key is not None:
            self._tasks.append(asyncio.create_task(self._watch(self.key), name="heartbeat:watch"))

    def _restart(self) -> None:
        """Swap the tasks for ones on the current key; no awaits (a reload is one step)."""
        for task in self._tasks:
            task.cancel()
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
        self._spawn()

    async def stop(self) -> None:
        self._stop.set()
        tasks = [*self._tasks, *self._ending]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self.key is not None:
            # "stopped": a runner started next under this name need not wait for our
            # beats to age out; best effort, a shutdown never waits on it for long
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send_beat("stopped"), STOP_BEAT_TIMEOUT)

    async def _send_beat(self, status: str = "ok") -> None:
        assert self.key is not None
        fields = beat_fields(self.resolved.runner, "runner", status, self.instance)
        await self.client.xadd(
            self.key,
            encode(self.beat_codec, fields),
            maxlen=self.beat_maxlen,
            approximate=True,
        )

    async def _beat(self) -> None:
        """The runner's own heartbeat, so other runners can claim for it if it dies."""
        while not self._stop.is_set():
            if self.key is not None:
                try:
                    await self._send_beat()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._beat_failed(exc)
                else:
                    if self._beat_failed_at is not None:
                        self.log.info("heartbeats: beating on %s again", self.key)
                        self._beat_failed_at = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.runner_interval)

    def _beat_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._beat_failed_at is None or now - self._beat_failed_at >= WARN_EVERY:
            self._beat_failed_at = now
            self.log.warning(
                "heartbeats: cannot write this runner's beat to %s (%s); other runners may "
                "take it for down and claim its pending messages (logged once a minute)",
                self.key,
                exc,
            )

    def _seen(self, raw: Mapping[str, Any], entry_id: str) -> None:
        fields = _fields(self.beat_codec, raw)
        if fields is None or not fields.get("agent"):
            return
        name = str(fields["agent"])
        ts = _timestamp(fields, entry_id)
        if fields.get("kind") == "runner":
            instance = fields.get("instance")
            if instance == self.instance:
                return  # our own beat
            if name == self.resolved.runner:
                # our consumers' names: never claimed for (we re-read our own pending)
                if instance and fields.get("status") != "stopped":
                    self._twin(str(instance), ts)
                return
            self.runners[name] = max(ts, self.runners.get(name, 0.0))
            return
        state = self.stats.agents.get(name)
        if state is not None and (state.last_beat is None or ts > state.last_beat):
            state.last_beat = ts

    def _twin(self, instance: str, ts: float) -> None:
        """Another process beats under our name: say so (once a minute) while it is live."""
        mono = time.monotonic()
        if self._twin_warned_at is not None and mono - self._twin_warned_at < WARN_EVERY:
            return
        if time.time() - ts > RUNNER_SILENCE * self.runner_interval or _earlier_self(instance):
            return
        self._twin_warned_at = mono
        host, _, rest = instance.partition(":")
        self.log.warning(
            "runner.name %s is also used by another runner (host %s pid %s); both read and "
            "claim as the same consumers: give each runner its own name",
            self.resolved.runner,
            host,
            rest.partition(":")[0],
        )

    async def _watch(self, key: str) -> None:
        # Not "$": that only sees entries added while XREAD blocks, so a beat arriving
        # between two reads would be missed. An empty seed means an empty stream anyway.
        last_id = "0-0"
        try:
            seed = await self.client.xrevrange(key, count=SEED_SCAN)
            for entry_id, fields in reversed(seed):
                self._seen(fields, entry_id)
            if seed:
                last_id = seed[0][0]
        except Exception as exc:
            self.log.warning("heartbeats: cannot read %s yet (%s)", key, exc)
        await self._check()
        while not self._stop.is_set():
            try:
                resp = await self.client.xread({key: last_id}, count=1000, block=500)
                for _, items in resp or []:
                    for entry_id, fields in items:
                        self._seen(fields, entry_id)
                        last_id = entry_id
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("heartbeats: reading %s failed (%s); retrying", key, exc)
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
            if now - ts > RUNNER_SILENCE * self.runner_interval:
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
                self.event_key,
                encode(self.event_codec, fields),
                maxlen=self.event_maxlen,
                approximate=True,
            )
        except Exception as exc:
            self.log.warning("heartbeats: cannot publish %s event (%s)", kind, exc)


__all__ = [
    "HeartbeatMonitor",
    "beat_fields",
    "check_runner_name",
    "key_template",
    "runner_instance",
]
