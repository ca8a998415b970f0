"""Turning one entry into an :class:`~cortex_flow.runtime.delivery.Outcome`: run the group's routes.

Decoding, the template context, matching, and executing ``to`` (a publish to commit
later), ``call`` and ``http``; then the verdict: ACK with its publishes, RETRY (a
``call`` or ``http`` that failed), or DEAD for a failure retrying cannot fix (an
undecodable entry; a ``when``, ``vars``, ``set`` or URL that cannot be evaluated) or
the last allowed delivery. Nothing here touches Redis: :mod:`cortex_flow.runtime.commit`
applies the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Generator, Mapping
from time import perf_counter
from typing import Any

from jinja2.runtime import Context

from cortex_flow.flow.templates import Now, context_base, context_over
from cortex_flow.flow.topology import ResolvedGroup, StreamKey
from cortex_flow.runtime.a2acall import send_message
from cortex_flow.runtime.deadlines import Deadlines
from cortex_flow.runtime.delivery import ACK, DEAD, RETRY, Acks, Entry, Outcome, backoff_ms
from cortex_flow.runtime.replies import Canceled, Conversations
from cortex_flow.runtime.routes import (
    HANDLER_EXITS,
    CompiledRoute,
    HandlerExit,
    Overran,
    PermanentError,
    Publish,
    RouteTable,
    call_inline,
    call_route,
)
from cortex_flow.runtime.stats import GroupStats, KeyStats, Latency
from cortex_flow.wire.codec import DecodeError, decode
from cortex_flow.wire.replies import DEADLINE as REQUEST_DEADLINE
from cortex_flow.wire.replies import FIELDS as REQUEST_FIELDS
from cortex_flow.wire.replies import REPLY as REQUEST_REPLY

# what EntryHandler.steps asks its driver to run: a call or http route, the message and
# the template context (or None)
Step = tuple[CompiledRoute, Any, Any]

# at most one "matched no route" warning per group in this many seconds
UNMATCHED_WARN_EVERY = 60.0


class EntryHandler:
    """Runs one group's route table on its entries.

    ``table`` (a route-only reload) and ``http`` (the first ``http`` route arrived, or
    a test stub) may be replaced while running; the next entry uses the new one.
    """

    def __init__(
        self,
        group: ResolvedGroup,
        table: RouteTable,
        codec: str,
        key_stats: Mapping[str, KeyStats],
        *,
        executor: Any = None,
        http: Any = None,
        log: logging.Logger | None = None,
        group_stats: GroupStats | None = None,
    ) -> None:
        self.table = table
        self.executor = executor
        self.http = http
        self.name = group.name
        self.codec = codec
        self.max_deliveries = group.spec.retry.max_deliveries
        self.backoff = group.spec.retry.backoff
        # deadlines, replies, cancels (runtime.replies); the client sends streamed parts
        self.conv: Conversations | None = None
        self.client: Any = None
        self._has_dead_letter = group.dead_letter is not None
        self._key_stats = key_stats
        self.log = log or logging.getLogger("cortex_flow.consumer")
        self.group_stats = group_stats  # where overrunning sync calls are counted
        spec = group.spec
        # sync calls stuck past their timeout before no new message starts
        self.max_stuck_calls = spec.max_stuck_calls or spec.concurrency
        if group_stats is not None:
            group_stats.max_stuck_calls = self.max_stuck_calls
        self.deadlines = Deadlines()  # the timeouts of async calls
        self._unmatched = 0  # acknowledged unmatched since the last warning
        self._unmatched_warn_at = 0.0  # time.monotonic() of the next allowed warning
        self._base_vars: dict[str, Any] = dict(group.spec.vars)
        # per source key, built once: the key's variables (read-only), and the names a
        # template context holds for every message of that key under ``_ctx_table``
        self._bound: dict[str, dict[str, Any]] = {}
        self._ctx_base: dict[str, dict[str, Any]] = {}
        self._ctx_table: RouteTable | None = None

    def steps(self, entry: Entry) -> Generator[Step, None, Outcome]:
        """Run the routes for ``entry`` up to each call or post, which the driver makes.

        Yields ``(route, msg, ctx)`` for every ``call`` (but inline sync ones, made here)
        and ``http`` route; the driver runs it and sends ``None`` back, or throws in what
        it raised. Returns the outcome; never raises for a route's failure.
        """
        begun = self._begin(entry)
        if isinstance(begun, Outcome):
            return begun
        msg, bound, ctx, involved = begun
        publishes: list[Publish] = []
        matched = False
        result: Any = None  # the last call's return value: the reply
        started = time.perf_counter()
        try:
            for route in self.table.routes:
                if route.when is not None and not route.matches(ctx):
                    continue
                matched = True
                action = route.action
                if action == "to":
                    publishes.append(route.publish(msg, ctx, bound))
                elif action == "call" and route.inline and not route.is_async:
                    result = call_inline(route, msg)
                elif action in ("call", "http", "a2a"):
                    result = yield route, msg, ctx
                if not route.continue_:
                    break
        except Exception as exc:
            return self._failure(entry, route, exc)
        finally:
            self._key_stats[entry.key.key].latency.observe(time.perf_counter() - started)
        return self._answered(entry, matched, publishes, involved, result)

    def run_batch(self, entries: list[Entry], acks: list[Acks]) -> list[Outcome]:
        """:meth:`steps` over a batch, for a table of ``to``, ``drop`` and inline sync calls
        only (``table.inline_sync``): nothing to wait for, so no generator per message.

        Entries that ran and have nothing to publish (the usual case) get no outcome of
        their own: they go to ``acks``, one :class:`Acks` per run of entries of one key,
        once the whole batch ran. The others' outcomes are returned, in order.
        """
        table = self.table
        outcomes: list[Outcome] = []
        done: list[Acks] = []
        # a request, a deadline, or a group with ttl/track: the full step path, and an
        # outcome of its own (its reply and task state go with its XACK, never a plain ack)
        conv = self.conv
        every = conv is not None and conv.every
        if table.needs_context or every:
            for entry in entries:
                if every or (
                    conv is not None
                    and (REQUEST_REPLY in entry.fields or REQUEST_DEADLINE in entry.fields)
                ):
                    outcomes.append(self._run_steps(entry))
                    continue
                outcome = self._run_one(entry)
                if outcome.kind == ACK and not outcome.publishes:
                    _ack(done, entry)
                else:
                    outcomes.append(outcome)
            acks += done
            return outcomes
        # No `when` and no template: every route applies, in order, to every message.
        routes, codec = table.routes, self.codec
        # the usual table: one inline call and nothing else
        only = routes[0].fn if len(routes) == 1 and routes[0].action == "call" else None
        current = ""
        bound: dict[str, Any] = {}
        ack: Acks | None = None
        # handler latency per run of one key: each of its entries counts the run's mean
        latency: Latency | None = None
        count = 0
        started = perf_counter()
        for entry in entries:
            fields = entry.fields
            if conv is not None and (REQUEST_REPLY in fields or REQUEST_DEADLINE in fields):
                begun = perf_counter()
                outcomes.append(self._run_steps(entry))  # observes its own latency
                started += perf_counter() - begun
                continue
            key = entry.key.key
            if key != current:
                if latency is not None:
                    now = perf_counter()
                    latency.observe_many((now - started) / count, count)
                    started = now
                current, bound, ack, count = key, self._bind(entry.key), None, 0
                latency = self._key_stats[key].latency
            count += 1
            try:
                msg = decode(codec, fields)
            except Exception as exc:  # RecursionError, MemoryError: this entry alone
                outcomes.append(undecodable(entry, exc))
                continue
            publishes: list[Publish] | None = None
            try:
                if only is not None:
                    route = routes[0]
                    only(msg)
                else:
                    for route in routes:
                        if route.action == "to":
                            if publishes is None:
                                publishes = []
                            publishes.append(route.publish(msg, None, bound))
                        elif route.fn is not None:
                            route.fn(msg)
                        if not route.continue_:
                            break
            except Exception as exc:
                outcomes.append(self._failure(entry, route, exc))
                continue
            except HANDLER_EXITS as exc:
                outcomes.append(self._failure(entry, route, HandlerExit.of(route, exc)))
                continue
            if publishes is not None:
                outcomes.append(Outcome(entry, ACK, publishes))
            elif not routes:
                outcomes.append(self._settled(entry, False, []))
            else:
                if ack is None:
                    ack = Acks(key, [])
                    done.append(ack)
                ack.entries.append(entry)
                if entry.deliveries > 1:
                    ack.retried += 1
        if latency is not None:
            latency.observe_many((perf_counter() - started) / count, count)
        acks += done
        return outcomes

    def _run_one(self, entry: Entry) -> Outcome:
        """One entry of an ``inline_sync`` table that needs a template context."""
        prepared = self._prepare(entry)
        if isinstance(prepared, Outcome):
            return prepared
        msg, bound, ctx = prepared
        publishes: list[Publish] = []
        matched = False
        started = perf_counter()
        try:
            for route in self.table.routes:
                if route.when is not None and not route.matches(ctx):
                    continue
                matched = True
                if route.action == "to":
                    publishes.append(route.publish(msg, ctx, bound))
                elif route.fn is not None:
                    route.fn(msg)
                if not route.continue_:
                    break
        except Exception as exc:
            return self._failure(entry, route, exc)
        except HANDLER_EXITS as exc:
            return self._failure(entry, route, HandlerExit.of(route, exc))
        finally:
            self._key_stats[entry.key.key].latency.observe(perf_counter() - started)
        return self._settled(entry, matched, publishes)

    def _run_steps(self, entry: Entry) -> Outcome:
        """:meth:`steps` run through for an inline table (no step ever yields)."""
        steps = self.steps(entry)
        try:
            next(steps)
        except StopIteration as stop:
            done: Outcome = stop.value
            return done
        raise RuntimeError("an inline table yielded a step")  # pragma: no cover

    def _bind(self, key: StreamKey) -> dict[str, Any]:
        """The variables of ``key`` (read-only), built once."""
        bound = self._bound.get(key.key)
        if bound is None:
            bound = {"priority": key.priority, "agent": key.agent, **self._base_vars}
            self._bound[key.key] = bound
        return bound

    def message(self, entry: Entry) -> Any:
        """The message of ``entry`` for a table that is one sync call (``table.only_call``),
        or the outcome of an entry that cannot be decoded (or expired, or canceled)."""
        begun = self._begin(entry)
        return begun if isinstance(begun, Outcome) else begun[0]

    def called(
        self,
        entry: Entry,
        route: CompiledRoute,
        error: Exception | None,
        seconds: float,
        value: Any = None,
    ) -> Outcome:
        """What :meth:`steps` returns once ``route``, a table's only route and a sync call
        (``table.only_call``), returned ``value`` or raised ``error``, ``seconds`` after it
        began."""
        self._key_stats[entry.key.key].latency.observe(seconds)
        if error is not None:
            return self._failure(entry, route, error)
        outcome = Outcome(entry, ACK, [])
        conv = self.conv
        if conv is not None and conv.involved(entry.fields):
            return conv.finish(outcome, value)
        return outcome

    def _begin(self, entry: Entry) -> tuple[Any, dict[str, Any], Any, bool] | Outcome:
        """:meth:`_prepare`, and whether the entry is involved in a conversation (a
        request, a deadline, a group with ttl/track: runtime.replies). Such an entry
        expired or canceled before it ran has its outcome here; a raw message loses the
        request's fields."""
        conv = self.conv
        involved = conv is not None and conv.involved(entry.fields)
        if involved:
            assert conv is not None
            early = conv.before(entry)
            if early is not None:
                return early
        prepared = self._prepare(entry)
        if isinstance(prepared, Outcome):
            return prepared
        msg, bound, ctx = prepared
        if involved and self.codec == "raw":
            for name in REQUEST_FIELDS:
                msg.pop(name, None)
        return msg, bound, ctx, involved

    def _answered(
        self, entry: Entry, matched: bool, publishes: list[Publish], involved: bool, result: Any
    ) -> Outcome:
        """:meth:`_settled`; an involved entry's reply (``result``, the last call's value)
        and task state added to its acknowledgement."""
        outcome = self._settled(entry, matched, publishes)
        if involved and outcome.kind == ACK:
            assert self.conv is not None
            return self.conv.finish(outcome, result)
        return outcome

    def _prepare(self, entry: Entry) -> tuple[Any, dict[str, Any], Any] | Outcome:
        """The decoded message, the key's variables and the template context (or None);
        an undecodable entry's outcome instead.

        Whatever fails here fails for this entry alone, and the same way every time
        (``RecursionError``, ``MemoryError``: hostile input): it is dead-lettered at once.
        """
        try:
            msg = decode(self.codec, entry.fields)
        except Exception as exc:
            return undecodable(entry, exc)
        bound = self._bind(entry.key)
        table = self.table
        try:
            ctx = self._context(entry, msg, bound, table) if table.needs_context else None
        except Exception as exc:
            return Outcome(entry, DEAD, [], f"template context: {type(exc).__name__}: {exc}")
        return msg, bound, ctx

    def _failure(self, entry: Entry, route: CompiledRoute, exc: Exception) -> Outcome:
        """The outcome of ``route`` raising ``exc`` for ``entry``."""
        if isinstance(exc, Canceled):
            assert self.conv is not None
            return self.conv.was_canceled(entry)
        if isinstance(exc, HandlerExit):
            self.log.error(
                "group %s: %s from %s: %s (%s); that is this message's failure, the runner "
                "goes on. A handler should raise an exception rather than exit",
                self.name,
                entry.id,
                entry.key.key,
                exc,
                route.label,
            )
            return self._failed(entry, f"{route.label}: {exc}")
        if isinstance(exc, PermanentError):
            return Outcome(entry, DEAD, [], str(exc), attempt_failed=True)
        if isinstance(exc, Overran):
            return self._failed(entry, f"{route.label}: {exc}")
        if isinstance(exc, TimeoutError):
            return self._failed(entry, f"timed out after {route.timeout:g}s ({route.label})")
        return self._failed(entry, f"{route.label}: {type(exc).__name__}: {exc}")

    def _settled(self, entry: Entry, matched: bool, publishes: list[Publish]) -> Outcome:
        """The outcome of routes that all ran: acknowledged, or unmatched."""
        if not matched:
            self._key_stats[entry.key.key].unmatched += 1
            if self._has_dead_letter:
                return Outcome(entry, DEAD, [], "no route matched")
            self._warn_unmatched()
        return Outcome(entry, ACK, publishes)

    async def handle(self, entry: Entry, task: asyncio.Task[Any] | None = None) -> Outcome:
        """Run the routes for ``entry``, awaiting each call; never raises for a route's failure.

        :meth:`steps`, with the calls and posts made here: one coroutine per message,
        which completes without suspending when nothing it awaits waits. ``task``: the
        task running this (found if not given). A request, or an entry with a deadline
        (runtime.replies), is checked first and answered with the last call's value.
        """
        begun = self._begin(entry)
        if isinstance(begun, Outcome):
            return begun
        msg, bound, ctx, involved = begun
        publishes: list[Publish] = []
        matched = False
        result: Any = None  # the last call's return value: the reply
        started = perf_counter()
        try:
            for route in self.table.routes:
                if route.when is not None and not route.matches(ctx):
                    continue
                matched = True
                action = route.action
                if action == "to":
                    publishes.append(route.publish(msg, ctx, bound))
                elif action == "call":
                    if route.is_async:
                        if involved:
                            result = await self.run_async(route, msg, entry, task)
                        else:
                            result = await self.deadlines.run(route.fn, msg, route.timeout, task)  # type: ignore[arg-type]
                    elif route.inline:
                        result = route.fn(msg)  # type: ignore[misc]
                    else:
                        result = await self._call_sync(route, msg, entry)
                elif action in ("http", "a2a"):
                    result = await self.post(route, msg, ctx)
                if not route.continue_:
                    break
        except Exception as exc:
            return self._failure(entry, route, exc)
        except HANDLER_EXITS as exc:
            return self._failure(entry, route, HandlerExit.of(route, exc))
        finally:
            self._key_stats[entry.key.key].latency.observe(perf_counter() - started)
        return self._answered(entry, matched, publishes, involved, result)

    async def run_async(
        self, route: CompiledRoute, msg: Any, entry: Entry, task: asyncio.Task[Any] | None = None
    ) -> Any:
        """An async call with its timeout; cancellable and streaming for a request."""
        conv = self.conv
        if conv is None or not conv.involved(entry.fields):
            return await self.deadlines.run(route.fn, msg, route.timeout, task)  # type: ignore[arg-type]

        def run(fn: Any, msg: Any) -> Any:
            return self.deadlines.run(fn, msg, route.timeout, task)

        assert route.fn is not None
        return await conv.run_async(route.fn, msg, entry, run, self.client, route.is_stream)

    async def _call_sync(self, route: CompiledRoute, msg: Any, entry: Entry) -> Any:
        """A sync call in the pool; past its timeout it is said to overrun until it returns."""
        overran = False

        def overrun(route: CompiledRoute) -> None:
            nonlocal overran
            overran = True
            self.overrun_started(route, entry)

        try:
            return await call_route(route, msg, self.executor, overrun, self.deadlines)
        finally:
            if overran:
                self.overrun_ended()

    def overrun_started(self, route: CompiledRoute, entry: Entry, stuck: int = 0) -> None:
        """A sync call for ``entry`` is past its timeout and still running: say so.

        ``stuck``: how many of the group's calls now are; at ``max_stuck_calls`` the group
        is held back (starts no new message until one returns).
        """
        held_back = stuck >= self.max_stuck_calls
        if self.group_stats is not None:
            self.group_stats.overrunning += 1
            self.group_stats.held_back = held_back
        self.log.warning(
            "group %s: %s (%s) timed out after %gs and is still running; a sync call "
            "cannot be stopped: the message stays held (its slot goes to the next one) and "
            "is retried only once it returns",
            self.name,
            entry.id,
            route.label,
            route.timeout,
        )
        if held_back:
            self.log.error(
                "group %s: %d sync calls are stuck past their timeout (max_stuck_calls %d); "
                "the group starts no new message until one returns (other groups go on). "
                "Make the handler return within its timeout, or raise max_stuck_calls",
                self.name,
                stuck,
                self.max_stuck_calls,
            )

    def overrun_ended(self, stuck: int = 0) -> None:
        """An overrunning sync call returned; ``stuck`` of the group's still run."""
        held_back = stuck >= self.max_stuck_calls
        if self.group_stats is not None:
            self.group_stats.overrunning -= 1
            self.group_stats.held_back = held_back
        if stuck + 1 >= self.max_stuck_calls > stuck:
            self.log.info(
                "group %s: a stuck sync call returned; new messages start again", self.name
            )

    def _warn_unmatched(self) -> None:
        """Say (at most once a minute) that unmatched messages are being acknowledged."""
        self._unmatched += 1
        now = time.monotonic()
        if now < self._unmatched_warn_at:
            return
        self._unmatched_warn_at = now + UNMATCHED_WARN_EVERY
        count, self._unmatched = self._unmatched, 0
        self.log.warning(
            "group %s: %d message(s) matched no route and were acknowledged; add a final "
            "`drop: true` route to make that explicit or a dead_letter to keep them",
            self.name,
            count,
        )

    def _context(self, entry: Entry, msg: Any, bound: dict[str, Any], table: RouteTable) -> Context:
        """The template context of one message; what its key and table fix is built once."""
        key = entry.key.key
        if self._ctx_table is not table:  # a route-only reload may change ``agents``
            self._ctx_table, self._ctx_base = table, {}
        base = self._ctx_base.get(key)
        if base is None:
            base = {**bound, "agents": table.agents, "stream": key, "group": self.name}
            base = self._ctx_base[key] = context_base(base)
        values = base.copy()
        values["msg"] = msg
        values["id"] = entry.id
        values["deliveries"] = entry.deliveries
        values["now"] = Now()
        return context_over(values)

    def _failed(self, entry: Entry, error: str) -> Outcome:
        # a failure on the last allowed delivery goes to the dead-letter stream now,
        # atomically with its XACK, rather than waiting for a claim that would do the same
        if entry.deliveries >= self.max_deliveries:
            return Outcome(entry, DEAD, [], error, attempt_failed=True)
        conv = self.conv
        # retries never run past a deadline: expire now instead of waiting for it
        if (
            conv is not None
            and conv.involved(entry.fields)
            and conv.retry_expires(entry, backoff_ms(self.backoff, entry.deliveries))
        ):
            self._key_stats[entry.key.key].failed += 1
            return conv.expired(entry, f"its deadline falls before its next retry ({error})")
        return Outcome(entry, RETRY, [], error, attempt_failed=True)

    async def post(self, route: CompiledRoute, msg: Any, ctx: Any) -> Any:
        """An ``http`` route: POST (or the route's method) the message; raises on >= 300.
        An ``a2a`` route: ``message/send`` to the agent; returns its reply."""
        if self.http is None:
            raise RuntimeError("no HTTP client available")
        literal = route.url.is_literal
        url = route.checked_url(route.url.source) if literal else route.render_url(ctx)
        spec = route.route.http
        try:
            if spec is None:
                a2a = route.route.a2a
                assert a2a is not None
                return await send_message(self.http, url, msg, a2a.headers, route.timeout)
            async with asyncio.timeout(route.timeout):
                # redirects are not followed: where a request goes is the flow file's to say
                async with self.http.request(
                    spec.method, url, json=dict(msg), headers=spec.headers, allow_redirects=False
                ) as resp:
                    if resp.status >= 300:
                        body = (await resp.text())[:200]
                        raise RuntimeError(f"HTTP {resp.status} from {url}: {body}")
            return None
        except OSError as exc:
            from cortex_flow.runtime.outbound import refused_reason  # loads aiohttp

            refused = refused_reason(exc)
            if refused is not None:
                raise PermanentError(f"{route.label}: request refused: {refused}") from None
            raise


def undecodable(entry: Entry, exc: Exception) -> Outcome:
    """The outcome of an entry whose fields cannot be decoded: a dead letter, with why."""
    if isinstance(exc, DecodeError):
        return Outcome(entry, DEAD, [], f"cannot decode: {exc}")
    return Outcome(entry, DEAD, [], f"cannot decode: {type(exc).__name__}: {exc}")


def _ack(acks: list[Acks], entry: Entry) -> None:
    """Add ``entry`` to the last of ``acks`` if it is of the same key, else to a new one."""
    key = entry.key.key
    if not acks or acks[-1].key != key:
        acks.append(Acks(key, []))
    ack = acks[-1]
    ack.entries.append(entry)
    if entry.deliveries > 1:
        ack.retried += 1
