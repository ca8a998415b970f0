"""Duties that happen once across runners: each held by one runner at a time.

Several runners on shared flows would each publish an agent's up/down event, trim the
streams and delete dead consumers. Each such duty has a lease in Redis
(:mod:`cortex_flow.wire.duties`): a runner takes it when it is free, renews it every
third of ``runner.duty_lease``, and gives it up on a graceful stop. A holder that dies
stops renewing; the lease expires and another runner takes it over within
``duty_lease`` (plus a third of it). Every act of a duty is fenced with the token the
lease came with, so a holder that stalled past its expiry acts no more
(:class:`~cortex_flow.wire.duties.LeaseLost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cortex_flow.wire.duties import Fence, LeaseLost, acquire_all, release
from cortex_flow.wire.redis_errors import explain, redis_user

# a duty that keeps failing (an ACL refusal, Redis down) is said at most this often (s)
FAIL_WARN_EVERY = 60.0

Act = Callable[[Fence], Awaitable[None]]

AGENTS_DUTY = "agents"  # agent up/down events (runtime/agentevents.py)
RETENTION_DUTY = "retention"  # trimming (runtime/retention.py)
CONSUMERS_DUTY = "consumers"  # deleting dead consumers (runtime/deadconsumers.py)
DELAYED_DUTY = "delayed"  # moving due delayed messages (runtime/delayed.py)
DUTIES = (AGENTS_DUTY, RETENTION_DUTY, CONSUMERS_DUTY, DELAYED_DUTY)
WARN_EVERY = 60.0  # a duty whose lease cannot be renewed says so at most this often


@dataclass
class _Duty:
    name: str
    key: str
    interval: float | None  # None: a lease only; the owner checks :meth:`Duties.fence`
    act: Act | None
    on_change: Callable[[bool], None] | None
    fence: Fence | None = None
    held_until: float = 0.0  # monotonic: past this the lease may be another's
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Duties:
    """The duties this runner takes part in; ``holder`` names it (``host:pid:start_ms``)."""

    def __init__(self, client: Any, *, holder: str, lease: float, log: logging.Logger) -> None:
        self.client = client
        self.holder = holder
        self.lease = lease
        self.log = log
        self._failures: dict[str, int] = {}  # failed acts per duty since last said
        self._failed_at: dict[str, float] = {}  # monotonic time each was last said
        self._duties: dict[str, _Duty] = {}
        self._stop = asyncio.Event()
        self._renew: asyncio.Task[None] | None = None
        self._warned_at: float | None = None  # when a failed renewal was last logged

    def add(
        self,
        name: str,
        key: str,
        *,
        interval: float | None = None,
        act: Act | None = None,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        """Take part in duty ``name`` (lease ``key``); ``act`` runs every ``interval`` while
        held. ``on_change(held)`` is told when this runner gains or loses the duty."""
        self._duties[name] = _Duty(name, key, interval, act, on_change)

    def rekey(self, name: str, key: str) -> None:
        """A reload moved the duty's lease (a new namespace): give the old one up."""
        duty = self._duties[name]
        if duty.key != key:
            self._set(duty, None)
            duty.key = key

    def fence(self, name: str) -> Fence | None:
        """The fence of duty ``name`` if this runner holds it now, else None."""
        duty = self._duties[name]
        if duty.fence is not None and time.monotonic() < duty.held_until:
            return duty.fence
        return None

    def lost(self, name: str) -> None:
        """An act found the lease another's: stop acting until it is taken again."""
        self._set(self._duties[name], None)

    async def start(self) -> None:
        self._stop.clear()
        await self._renew_all()  # the first owner is known before the first act
        self._renew = asyncio.create_task(self._renewing(), name="duties:lease")
        for duty in self._duties.values():
            if duty.act is not None and duty.interval is not None:
                duty.task = asyncio.create_task(self._acting(duty), name=f"duty:{duty.name}")

    async def stop(self) -> None:
        self._stop.set()
        tasks = [t for t in [self._renew, *(d.task for d in self._duties.values())] if t]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        held = [d for d in self._duties.values() if d.fence is not None]
        releases = [release(self.client, d.fence) for d in held if d.fence is not None]
        with contextlib.suppress(Exception):  # best effort: else the leases expire
            await asyncio.wait_for(asyncio.gather(*releases), 1.0)
        for duty in held:
            self._set(duty, None)

    # -- the lease ---------------------------------------------------------------------

    def _set(self, duty: _Duty, fence: Fence | None) -> None:
        was = duty.fence
        duty.fence = fence
        if fence is None and was is not None:
            self.log.info("duty %s: no longer held by this runner", duty.name)
        elif fence is not None and (was is None or was.token != fence.token):
            self.log.info("duty %s: taken by this runner (token %d)", duty.name, fence.token)
        else:
            return
        if duty.on_change is not None:
            duty.on_change(fence is not None)

    async def _renew_all(self) -> None:
        """Take or renew every duty's lease in one call (their keys share a slot)."""
        duties = list(self._duties.values())
        if not duties:
            return
        started = time.monotonic()
        try:
            fences = await acquire_all(
                self.client, [d.key for d in duties], self.holder, self.lease
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            for duty in duties:
                if duty.fence is not None and started >= duty.held_until:
                    self._set(duty, None)  # it may be another's by now
            if self._warned_at is None or started - self._warned_at >= WARN_EVERY:
                self._warned_at = started
                self.log.warning(
                    "duties: cannot take or renew their leases (%s); retrying every %gs",
                    exc,
                    self.lease / 3,
                )
            return
        for duty, fence in zip(duties, fences, strict=True):
            if fence is not None:
                duty.held_until = started + self.lease
            self._set(duty, fence)

    async def _renewing(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.lease / 3)
            if not self._stop.is_set():
                await self._renew_all()

    # -- acts --------------------------------------------------------------------------

    def _failed(self, duty: _Duty, exc: Exception) -> None:
        """Say a failing act once per ``FAIL_WARN_EVERY`` with a count (it retries every
        interval: a refusal would otherwise log four lines a second)."""
        count = self._failures.get(duty.name, 0) + 1
        self._failures[duty.name] = count
        now = time.monotonic()
        if now - self._failed_at.get(duty.name, -FAIL_WARN_EVERY) < FAIL_WARN_EVERY:
            return
        self._failed_at[duty.name] = now
        self._failures[duty.name] = 0
        why = explain(exc, user=redis_user(self.client))
        self.log.warning(
            "duty %s failed (%s); trying again every %gs (%d time%s since last said)",
            duty.name,
            why.text if why is not None else f"{type(exc).__name__}: {exc}",
            duty.interval,
            count,
            "" if count == 1 else "s",
        )

    async def _acting(self, duty: _Duty) -> None:
        """Act every ``interval`` while held; the first act one interval after start, once
        the heartbeat watch knows which runners are alive."""
        assert duty.act is not None and duty.interval is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), duty.interval)
        while not self._stop.is_set():
            fence = self.fence(duty.name)
            if fence is not None:
                try:
                    await duty.act(fence)
                except asyncio.CancelledError:
                    raise
                except LeaseLost as exc:
                    self.log.info("duty %s: stopped (%s)", duty.name, exc)
                    self.lost(duty.name)
                except Exception as exc:
                    self._failed(duty, exc)
            wait = duty.interval if fence is not None else min(duty.interval, self.lease / 3)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)


__all__ = [
    "AGENTS_DUTY",
    "CONSUMERS_DUTY",
    "DELAYED_DUTY",
    "DUTIES",
    "RETENTION_DUTY",
    "Act",
    "Duties",
]
