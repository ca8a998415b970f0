"""The gate entries of a flow-controlled group pass before their handlers start.

In order: ``dedup`` (a copy of a message already handled is acknowledged unhandled; a
copy of one still being handled waits for its outcome), ``rate_limit`` (tokens from the
bucket every runner shares, taken for a batch at once) and ``max_in_flight`` (a slot
among the group's, leased, renewed with the entries, released at commit). An entry
that waits keeps its lease like any other the consumer holds: it is not failed,
retried or claimed. A stop gives the waiting entries up; they stay pending and are
taken back by this consumer's next start or by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from cortex_flow.flow.rates import per_second
from cortex_flow.flow.templates import Template, compile_template
from cortex_flow.flow.topology import ResolvedGroup
from cortex_flow.runtime.delivery import Entry
from cortex_flow.runtime.ratelimit import RateLimiter
from cortex_flow.runtime.stats import FlowStats
from cortex_flow.wire.codec import decode
from cortex_flow.wire.flowcontrol import (
    DUPLICATE,
    RUN,
    dedup_states,
    group_key,
    release_slots,
    renew_slots,
    take_slots,
)

DEDUP_RECHECK = 0.1  # seconds between two looks at a copy whose first is being handled
SLOT_RECHECK = 0.02  # seconds between two asks for a free in-flight slot


Dispatch = Callable[[list[Entry]], Awaitable[None]]


class FlowGate:
    """Rate, concurrency and dedup of one group, shared through Redis by every runner."""

    def __init__(
        self,
        client: Any,
        group: ResolvedGroup,
        namespace: str,
        codec: str,
        *,
        stopping: asyncio.Event,
        release: Callable[[list[Entry]], None],
        on_error: Callable[[], None],
        log: logging.Logger,
    ) -> None:
        spec = group.spec
        self.client = client
        self.group = group
        self.codec = codec
        self.stopping = stopping
        self.release_entries = release  # entries given up (a stop) or acknowledged here
        self.on_error = on_error  # admitting failed: the consumer re-reads its pending
        self.log = log
        self.stats = FlowStats()
        self._ns = namespace
        self._lease_ms = int(spec.retry.claim_idle * 1000)
        rate = spec.rate_limit
        self._limiter: RateLimiter | None = None
        if rate is not None:
            per_s = per_second(rate.rate)
            burst = rate.burst or max(1, math.ceil(per_s))
            self._limiter = RateLimiter(client, per_s, burst, spec.batch, log)
        self._rate_key = compile_template(rate.key) if rate and rate.key else None
        self._bucket = group_key(namespace, group.name, "rate:")
        self._dedup = spec.dedup
        self._dedup_key = compile_template(spec.dedup.key) if spec.dedup else None
        self._limit = spec.max_in_flight
        self._slots_key = group_key(namespace, group.name, "inflight")
        self._held: dict[tuple[str, str], str] = {}  # entry -> its slot holder name
        self._renewing: asyncio.Task[None] | None = None
        self._admitting: set[asyncio.Task[None]] = set()

    @staticmethod
    def wanted(group: ResolvedGroup) -> bool:
        spec = group.spec
        return bool(spec.rate_limit or spec.dedup or spec.max_in_flight)

    # -- admitting ---------------------------------------------------------------------

    def admit_now(self, entries: list[Entry]) -> bool:
        """Whether ``entries`` pass at once, without a round trip: only a plain rate limit
        (one bucket, no dedup, no max_in_flight) whose reserve holds their tokens."""
        if self._limiter is None or self._rate_key is not None or self._dedup or self._limit:
            return False
        return self._limiter.take_reserved({self._bucket: len(entries)})

    def spawn(self, entries: list[Entry], dispatch: Dispatch) -> None:
        """Admit ``entries`` in a task of their own: the consumer's loop goes on reading
        (within its capacity), retrying and claiming while they wait."""
        task = asyncio.create_task(self.admit(entries, dispatch), name=f"gate:{self.group.name}")
        self._admitting.add(task)
        task.add_done_callback(self._admitted)

    def _admitted(self, task: asyncio.Task[None]) -> None:
        self._admitting.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.warning(
                "group %s: flow control could not admit messages (%s: %s); they stay "
                "pending and are read again",
                self.group.name,
                type(exc).__name__,
                exc,
            )
            self.on_error()

    async def drain(self) -> None:
        """Wait for every admitting task (a stop makes them give their entries up)."""
        while self._admitting:
            await asyncio.gather(*self._admitting, return_exceptions=True)

    def cancel(self) -> list[asyncio.Task[None]]:
        tasks = list(self._admitting)
        for task in tasks:
            task.cancel()
        return tasks

    async def admit(self, entries: list[Entry], dispatch: Dispatch) -> None:
        """Hand ``entries`` to ``dispatch`` as each passes the gate, in order; returns when
        all passed, were acknowledged as duplicates, or were given up (a stop, an error)."""
        batch = _Batch(self, entries, dispatch)
        rest = list(entries)
        try:
            while rest and not self.stopping.is_set():
                ready, rest = await self._dedup_pass(rest, batch) if self._dedup else (rest, [])
                await self._rate_pass(ready, batch)
                if rest:
                    await self._sleep(DEDUP_RECHECK)
        finally:
            batch.give_up(list(batch.left.values()))

    async def _dedup_pass(
        self, entries: list[Entry], batch: _Batch
    ) -> tuple[list[Entry], list[Entry]]:
        """(to run, to look at again); duplicates are acknowledged here."""
        assert self._dedup is not None and self._dedup_key is not None
        window = int(self._dedup.window * 1000)
        keys = [self._render(self._dedup_key, e) for e in entries]
        # a message without a key (the template renders empty) is never a duplicate
        run = [e for e, k in zip(entries, keys, strict=True) if not k]
        keyed = [(e, k) for e, k in zip(entries, keys, strict=True) if k]
        rows = [
            (group_key(self._ns, self.group.name, f"dedup:{k}"), e.key.key, e.id) for e, k in keyed
        ]
        states = await dedup_states(self.client, self.group.name, window, rows) if rows else []
        run += [e for (e, _), s in zip(keyed, states, strict=True) if s == RUN]
        dupes = [e for (e, _), s in zip(keyed, states, strict=True) if s == DUPLICATE]
        later = [e for (e, _), s in zip(keyed, states, strict=True) if s not in (RUN, DUPLICATE)]
        if dupes:
            by_key: dict[str, list[str]] = defaultdict(list)
            for entry in dupes:
                by_key[entry.key.key].append(entry.id)
            for key, ids in by_key.items():
                await self.client.xack(key, self.group.name, *ids)
            self.stats.duplicates += len(dupes)
            batch.give_up(dupes)
        return run, later

    async def _rate_pass(self, entries: list[Entry], batch: _Batch) -> None:
        if self._limiter is None:
            await self._slot_pass(entries, batch)
            return
        rest = entries
        while rest and not self.stopping.is_set():
            by_bucket: dict[str, list[Entry]] = defaultdict(list)
            if self._rate_key is None:
                by_bucket[self._bucket] = rest
            else:
                for entry in rest:
                    name = self._render(self._rate_key, entry)
                    by_bucket[group_key(self._ns, self.group.name, f"rate:{name}")].append(entry)
            wants = {bucket: len(some) for bucket, some in by_bucket.items()}
            granted, wait = await self._limiter.take(wants)
            passed, rest = [], []
            for bucket, some in by_bucket.items():
                passed += some[: granted[bucket]]
                rest += some[granted[bucket] :]
            if passed:
                await self._slot_pass(passed, batch)
            if rest:
                started = time.monotonic()
                await self._sleep(max(0.001, wait))
                self.stats.rate_waits += (time.monotonic() - started) * len(rest)

    async def _slot_pass(self, entries: list[Entry], batch: _Batch) -> None:
        if self._limit is None:
            await batch.passed(entries)
            return
        rest = entries
        while rest and not self.stopping.is_set():
            names = [f"{self.group.consumer} {e.key.key} {e.id}" for e in rest]
            got = await take_slots(self.client, self._slots_key, self._limit, self._lease_ms, names)
            if got:
                for entry, name in zip(rest[:got], names, strict=False):
                    self._held[(entry.key.key, entry.id)] = name
                self._ensure_renewing()
                await batch.passed(rest[:got])
                rest = rest[got:]
            if rest:
                await self._sleep(SLOT_RECHECK)

    def _render(self, template: Template | None, entry: Entry) -> str:
        if template is None:
            return ""
        try:
            msg = decode(self.codec, entry.fields)
        except Exception:
            msg = {}  # undecodable: its handler dead-letters it; any bucket will do
        values = {
            "msg": msg,
            "id": entry.id,
            "stream": self.group.stream,
            "group": self.group.name,
            "priority": entry.key.priority,
            "agent": entry.key.agent,
        }
        try:
            return template.render_values(values)
        except Exception:
            return ""

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    # -- in-flight slots -----------------------------------------------------------------

    def finished(self, keys: list[tuple[str, str]]) -> None:
        """These entries were committed or given up: free their slots."""
        if self._limit is None:
            return
        names = [n for k in keys if (n := self._held.pop(k, None)) is not None]
        if names:
            task = asyncio.ensure_future(self._release(names))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _release(self, names: list[str]) -> None:
        try:
            await release_slots(self.client, self._slots_key, names)
        except Exception as exc:  # they expire with their lease
            self.log.warning("group %s: cannot free in-flight slots (%s)", self.group.name, exc)

    def _ensure_renewing(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._renew(), name=f"slots:{self.group.name}")

    async def _renew(self) -> None:
        while self._held:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await renew_slots(
                    self.client, self._slots_key, self._lease_ms, list(self._held.values())
                )
            except Exception as exc:
                self.log.warning(
                    "group %s: cannot renew in-flight slots (%s)", self.group.name, exc
                )

    def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
        if self._limiter is not None:
            self._limiter.close()


class _Batch:
    """The entries of one admit not yet passed on: given up together on a stop or error."""

    def __init__(self, gate: FlowGate, entries: list[Entry], dispatch: Dispatch) -> None:
        self.gate = gate
        self.dispatch = dispatch
        self.left = {(e.key.key, e.id): e for e in entries}
        gate.stats.waiting += len(entries)

    def _take(self, entries: list[Entry]) -> list[Entry]:
        return [e for e in entries if self.left.pop((e.key.key, e.id), None) is not None]

    async def passed(self, entries: list[Entry]) -> None:
        taken = self._take(entries)
        self.gate.stats.waiting -= len(taken)
        await self.dispatch(taken)

    def give_up(self, entries: list[Entry]) -> None:
        """No longer held by the consumer: acknowledged here, or left pending for a re-read."""
        taken = self._take(entries)
        if taken:
            self.gate.stats.waiting -= len(taken)
            self.gate.release_entries(taken)


__all__ = ["FlowGate", "FlowStats"]
