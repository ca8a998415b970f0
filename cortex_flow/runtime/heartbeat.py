"""Heartbeats: the runner's own beat, and the watch over every declared agent.

Agents (and runners) publish beats (:mod:`cortex_flow.wire.heartbeats`) to the heartbeat
stream; runners always beat, on ``<namespace>runners`` when the flows declare no
``heartbeats:`` (:attr:`Resolved.runner_key`). A runner's beats also carry ``instance``
(``host:pid:start_ms``), so a second process started under the same runner name is
refused at start. An agent silent past its timeout is marked down: metrics and status
show it, and the pending entries of consumers named after it are claimed at once. The
``agent_down`` / ``agent_up`` events (to ``heartbeats.on_down``) are published only by
the runner holding the ``agents`` duty (:mod:`cortex_flow.runtime.agentevents`), one per
transition.

Claims for a silent runner or agent are safe with any number of runners watching: each
XCLAIM asks for a minimum idle time of half of how long the owner has been silent beyond
one beat interval, so an entry one survivor claimed (its idle time starts again) is not
claimed again by another who noticed the same silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.topology import Resolved, key_template
from cortex_flow.runtime.agentevents import AgentEvents
from cortex_flow.runtime.duties import Duties
from cortex_flow.runtime.stats import AgentState, RunnerStats
from cortex_flow.wire.faults import error_text
from cortex_flow.wire.heartbeats import (
    SCAN_LIMIT,
    Beat,
    beat_fields,
    encode_beat,
    latest_beats,
    parse_beat,
)
from cortex_flow.wire.processes import pid_alive
from cortex_flow.wire.redis_errors import explain, redis_user

WARN_EVERY = 60.0  # a failing beat of the runner's own is logged at most this often
STOP_BEAT_TIMEOUT = 1.0  # the last ("stopped") beat must not hold up a shutdown
RUNNER_SILENCE = 3  # a runner silent for this many of its intervals is down
RUNNERS_CAP = 1000  # the default runner stream (no heartbeats declared) is kept this short
WATCH_BLOCK = 5.0  # the longest the watch's read waits for beats (s)
READ_WARN_EVERY = 10.0  # a failing watch read is logged at most this often (s)

# what to do when an agent or runner goes silent: (consumer name, XCLAIM min-idle in ms)
OnDown = Callable[[str, int], None]


def claim_idle_ms(silence: float, interval: float) -> int:
    """The min-idle for claiming a silent owner's entries.

    It may have touched them until its next beat was due, so they are idle at least
    ``silence - interval``; half of that is asked, leaving room for clocks that differ
    and beats written late. What one survivor claimed a moment before is idle for far
    less when another comes to it (milliseconds), so no two claim one entry.
    """
    return max(0, int((silence - interval) * 500))


def runner_instance(started_at: float | None = None) -> str:
    """``host:pid:start_ms``: tells two processes using one runner name apart."""
    started = time.time() if started_at is None else started_at
    return f"{socket.gethostname()}:{os.getpid()}:{int(started * 1000)}"


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
    return pid == os.getpid() or not pid_alive(pid)


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
    latest = await latest_beats(client, key, codec, since=now - 2 * window)
    for other, beat in latest.runners.get(name, {}).items():
        if not other or other == instance:
            continue  # an older runner without instances, or ourselves
        age = now - beat.ts
        if age > window or beat.status == "stopped" or _earlier_self(other):
            continue
        host, _, rest = other.partition(":")
        pid = rest.partition(":")[0]
        raise CortexFlowError(
            f"runner.name {name} is already used by another runner (host {host} pid {pid}, "
            f"beat {max(age, 0):.0f}s ago); give each runner its own name"
        )


class HeartbeatMonitor:
    """Follows the heartbeat stream; calls ``on_down(name)`` when an agent goes silent."""

    def __init__(
        self,
        client: Any,
        resolved: Resolved,
        stats: RunnerStats,
        *,
        runner_interval: float,
        on_down: OnDown,
        log: logging.Logger,
        instance: str | None = None,
        duties: Duties | None = None,
    ) -> None:
        self.client = client
        self.stats = stats
        self.on_down = on_down
        self.log = log
        self.runner_interval = runner_interval
        self.instance = instance or runner_instance()
        self.events = AgentEvents(client, duties, log)
        self.key: str | None = None
        self.runners: dict[str, float] = {}  # other runners' last beats, kept across reloads
        self.stopped: set[str] = set()  # runners whose last beat said "stopped"
        self.seen_beats = False  # the watch has read the stream once: runners are known
        self._read_failures = 0  # failed reads of the watch since it last read
        self._read_warned_at: float | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ending: set[asyncio.Task[None]] = set()  # cancelled by a reload, not yet done
        self._beat_failed_at: float | None = None  # when a failed beat was last logged
        self._read_failed_at = -WARN_EVERY  # when a refused read was last logged
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
        self.events.update(resolved)
        topo = resolved.topology
        # a declared heartbeat stream is trimmed by retention; the default one at each beat
        self.beat_maxlen: int | None = RUNNERS_CAP
        self.beat_codec = "raw"
        if topo.heartbeats is not None:
            beats = topo.streams[topo.heartbeats.stream]
            self.beat_maxlen, self.beat_codec = None, beats.codec
        changed = resolved.runner_key != self.key
        self.key = resolved.runner_key
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
            encode_beat(self.beat_codec, fields),
            maxlen=self.beat_maxlen,
            approximate=self.beat_maxlen is not None,
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
                self._why(exc),
            )

    def _why(self, exc: BaseException) -> str:
        """``exc`` in words: an ACL, credential, TLS or DNS refusal with its fix."""
        keys = [self.key] if self.key else []
        why = explain(exc, user=redis_user(self.client), keys=keys)
        return why.text if why is not None else error_text(exc)

    def _seen(self, beat: Beat) -> None:
        name, ts = beat.agent, beat.ts
        if beat.kind == "runner":
            if beat.instance == self.instance:
                return  # our own beat
            if name == self.resolved.runner:
                # our consumers' names: never claimed for (we re-read our own pending)
                if beat.instance and beat.status != "stopped":
                    self._twin(beat.instance, ts)
                return
            self.runners[name] = max(ts, self.runners.get(name, 0.0))
            if beat.status == "stopped":
                self.stopped.add(name)
            else:
                self.stopped.discard(name)
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
            seed = await latest_beats(self.client, key, self.beat_codec, limit=SCAN_LIMIT)
            for beat in seed.agents.values():
                self._seen(beat)
            for instances in seed.runners.values():
                for beat in instances.values():
                    self._seen(beat)
            last_id = seed.newest_id or last_id
            self.seen_beats = True
        except Exception as exc:
            self.log.warning("heartbeats: cannot read %s yet (%s)", key, self._why(exc))
        await self._check()
        while not self._stop.is_set():
            try:
                resp = await self.client.xread(
                    {key: last_id}, count=1000, block=self._watch_block_ms()
                )
                for _, items in resp or []:
                    for entry_id, fields in items:
                        parsed = parse_beat(self.beat_codec, entry_id, fields)
                        if parsed is not None:
                            self._seen(parsed)
                        last_id = entry_id
                self.seen_beats = True
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._read_failed(key, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
            else:
                if self._read_failures:
                    self.log.info("heartbeats: reading %s again", key)
                    self._read_failures, self._read_warned_at = 0, None

    def _read_failed(self, key: str, exc: Exception) -> None:
        """A failed read of the watch (a failover, Redis down): said once per
        ``READ_WARN_EVERY`` with a count, not once a second."""
        self._read_failures += 1
        now = time.monotonic()
        if self._read_warned_at is not None and now - self._read_warned_at < READ_WARN_EVERY:
            return
        self._read_warned_at = now
        self.log.warning(
            "heartbeats: reading %s failed (%s); retrying every second (%d time%s so far)",
            key,
            self._why(exc),
            self._read_failures,
            "" if self._read_failures == 1 else "s",
        )

    def live_runners(self) -> set[str] | None:
        """The other runners beating now (not silent, not stopped); None while unknown
        (no heartbeat stream, or the watch has not read it yet)."""
        if self.key is None or not self.seen_beats:
            return None
        return set(self.runners) - self.stopped

    def _watch_block_ms(self) -> int:
        """How long the watch's read may wait: until the next agent or runner could be
        past its timeout (one read per wait, not a poll), ``WATCH_BLOCK`` at most."""
        now = time.time()
        deadlines = [
            s.last_beat + s.timeout for s in self.stats.agents.values() if s.up and s.last_beat
        ]
        silence = RUNNER_SILENCE * self.runner_interval
        deadlines.extend(ts + silence for ts in self.runners.values())
        wait = min([WATCH_BLOCK, *(d - now for d in deadlines)])
        return max(10, int(wait * 1000) + 10)

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
                state.up = True
            elif not alive and state.up is not False:
                state.up = False
                silence = now - state.last_beat
                self.log.warning(
                    "agent %s is down: no heartbeat for %.0fs (timeout %gs); claiming its "
                    "pending messages",
                    state.name,
                    silence,
                    state.timeout,
                )
                spec = self.resolved.agents[state.name].heartbeat
                interval = spec.interval if spec is not None else state.timeout
                self.on_down(state.name, claim_idle_ms(silence, interval))
        await self.events.publish(self.stats.agents.values())
        for name, ts in list(self.runners.items()):
            silence = now - ts
            if silence > RUNNER_SILENCE * self.runner_interval:
                self.log.warning("runner %s stopped beating; claiming its pending messages", name)
                del self.runners[name]
                self.on_down(name, claim_idle_ms(silence, self.runner_interval))


__all__ = [
    "HeartbeatMonitor",
    "beat_fields",
    "check_runner_name",
    "key_template",
    "runner_instance",
]
