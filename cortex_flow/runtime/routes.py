"""A group's route table, compiled once: expressions, templates, callables, targets.

Executing a route is the consumer's job; this module decides *what* each route
does for a message (match, target key, fields) so the decision is testable
without Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import UndefinedError
from jinja2.runtime import Context

from cortex_flow.flow.checks import resolve_callable
from cortex_flow.flow.models import Route, StreamSpec
from cortex_flow.flow.outbound import FixedOrigin, check_request, fixed_origin, quote_outputs
from cortex_flow.flow.slots import PARTITION, PartitionPicker
from cortex_flow.flow.templates import Expression, Template, TemplateLimitError, make_context
from cortex_flow.flow.topology import ResolvedGroup, key_template, key_variables
from cortex_flow.runtime.callpool import CallPool, default_pool
from cortex_flow.runtime.deadlines import Deadlines
from cortex_flow.wire.codec import encode

# How a ``call`` route's ``module:function`` becomes a callable when a table is compiled.
# cortex_flow.testing.harness sets it around Runner.start to stub or record call targets.
call_resolver: ContextVar[Callable[[str], object]] = ContextVar(
    "cortex_flow_call_resolver", default=resolve_callable
)


class PermanentError(Exception):
    """A failure retrying cannot fix (bad template data, unknown target): dead-letter now."""


# What a handler may raise that Python does not count as an Exception. Raised by one
# handler for one message, each is that message's failure, never the runner's exit.
HANDLER_EXITS = (SystemExit, KeyboardInterrupt, GeneratorExit)


class HandlerExit(Exception):
    """A handler raised SystemExit, KeyboardInterrupt or GeneratorExit: a failure."""

    @classmethod
    def of(cls, route: CompiledRoute, exc: BaseException) -> HandlerExit:
        """``exc``, raised by ``route``'s handler, as its message's failure."""
        args = ", ".join(repr(a) for a in exc.args)
        return cls(f"{route.handler} raised {type(exc).__name__}({args})")


def _failure(label: str, what: str, exc: Exception, raw: bool) -> PermanentError:
    """``exc``, raised evaluating ``what`` of a route, as a PermanentError that says why.

    The same message fails the same way every time: retrying is pointless.
    """
    if isinstance(exc, TemplateLimitError):  # "template exceeded its ... limit": say no more
        return PermanentError(f"{label}: {what}: {exc}")
    text = f"{label}: {what} failed: {type(exc).__name__}: {exc}"
    if raw and isinstance(exc, TypeError) and "str" in str(exc):
        text += " (message fields are strings on a raw stream; convert, e.g. msg.n | int)"
    return PermanentError(text)


@dataclass(frozen=True, slots=True)
class Publish:
    """One XADD the route asks for; committed together with the source entry's XACK."""

    key: str
    fields: dict[str, str]
    # how the commit applies it (runtime.replies): "" an XADD; "r<n>" a reply (XADD
    # NOMKSTREAM MAXLEN ~ n: a reply stream that expired is not made again); "h<ms>" a
    # task state (HSET, PEXPIRE ms); "c" a guard: the entry's other writes are skipped
    # if its task was canceled (HGET key cancel)
    mode: str = ""


class CompiledRoute:
    """One route with everything it needs at message time."""

    def __init__(
        self,
        index: int,
        route: Route,
        streams: Mapping[str, StreamSpec],
        group: ResolvedGroup,
        agents: frozenset[str],
    ) -> None:
        self.index = index
        self.route = route
        self.label = route.name or f"routes[{index}]"
        self.action = route.action
        self.when = Expression(route.when) if route.when is not None else None
        self.continue_ = route.continue_
        self.agents = agents
        self.raw = streams[group.stream].codec == "raw"
        self.fn: Callable[..., Any] | None = None
        self.is_async = False
        self.is_stream = False
        self.inline = False
        self.timeout = 0.0
        self.handler = ""  # ``module:function`` of a call route, for errors and logs
        if route.call is not None:
            self.handler = route.call.function
            fn = call_resolver.get()(route.call.function)
            assert callable(fn)
            self.fn = fn
            self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
                getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
            )
            # an async generator streams its items as partial replies (runtime.replies)
            self.is_stream = inspect.isasyncgenfunction(fn)
            self.is_async = self.is_async or self.is_stream
            self.inline = route.call.inline
            self.timeout = route.call.timeout
        if route.outbound is not None:
            self.timeout = route.outbound.timeout
            self.url = Template(route.outbound.url, quote_outputs)
            origin = fixed_origin(route.outbound.url)
            if isinstance(origin, str):  # validation refuses it first; a library user may not
                raise ValueError(f"{self.label}: {route.action}.url: {origin}")
            self.origin: FixedOrigin = origin
        self.target: StreamSpec | None = None
        if route.to is not None:
            self.target = streams[route.to]
            self.target_name = route.to
            needed = key_variables(self.target)
            self.key = key_template(self.target.key)
            self.vars = {k: Template(v) for k, v in route.vars.items()}
            # variables neither the route nor a literal gives come from the source entry;
            # a partitioned target's partition is picked per message instead
            self.inherit = tuple(
                v for v in sorted(needed) if v not in route.vars and v != PARTITION
            )
            self.picker = (
                PartitionPicker(self.target.partitions, self.target.partition_key)
                if PARTITION in needed and self.target.partitions
                else None
            )
            self.set = {k: Template(v) for k, v in (route.set or {}).items()}
            self.set_given = route.set is not None
        self.needs_context = self.when is not None or (
            self.target is not None
            and (
                not self.key.is_literal
                or any(not t.is_literal for t in self.vars.values())
                or any(not t.is_literal for t in self.set.values())
            )
        )
        if route.outbound is not None and not self.url.is_literal:
            self.needs_context = True

    def matches(self, ctx: Context | None) -> bool:
        """Whether the route applies; a missing message field means no match.

        Any other error (``msg.n > 3`` with ``n`` a string) raises PermanentError.
        """
        if self.when is None:
            return True
        assert ctx is not None
        try:
            return bool(self.when.evaluate(ctx))
        except UndefinedError:
            return False
        except Exception as exc:
            raise _failure(self.label, f"when {self.when.source!r}", exc, self.raw) from exc

    def render_url(self, ctx: Context) -> str:
        """The ``http`` URL for this message; raises PermanentError when it cannot render
        or may not be requested (see :func:`cortex_flow.flow.outbound.check_request`)."""
        try:
            url = self.url.render(ctx)
        except UndefinedError as exc:
            raise PermanentError(f"{self.label}: url: {exc.message}") from None
        except Exception as exc:
            raise _failure(self.label, "url", exc, self.raw) from exc
        return self.checked_url(url)

    def checked_url(self, url: str) -> str:
        """``url``, or PermanentError when the outbound policy refuses it."""
        refused = check_request(url, self.origin)
        if refused is not None:
            raise PermanentError(f"{self.label}: request refused: {refused}")
        return url

    def publish(self, msg: Any, ctx: Context | None, bound: Mapping[str, str | None]) -> Publish:
        """The XADD this route makes for ``msg``; raises PermanentError on bad data."""
        assert self.target is not None
        what = "key"  # the template being rendered, for the error
        try:
            values: dict[str, Any] = {v: bound.get(v) for v in self.inherit}
            for name, template in self.vars.items():
                what = f"vars.{name}"
                values[name] = template.render(ctx) if ctx is not None else template.source
            out: Mapping[str, Any] = msg
            if self.set_given:
                fields = {}
                for name, template in self.set.items():
                    what = f"set.{name}"
                    fields[name] = template.render(ctx) if ctx is not None else template.source
                out = fields
            what = "key"
            if self.picker is not None:  # from the message as published
                values[PARTITION] = self.picker.tag(out)
            key = self.key.source if self.key.is_literal else self.key.render(make_context(values))
        except UndefinedError as exc:
            raise PermanentError(f"{self.label}: {exc.message}") from None
        except Exception as exc:  # TypeError, SecurityError, ...: the same every time
            raise _failure(self.label, what, exc, self.raw) from exc
        priorities = self.target.priorities
        if priorities and values.get("priority") not in priorities:
            raise PermanentError(
                f"{self.label}: priority {values.get('priority')!r} is not one of "
                f"{', '.join(priorities)} of stream {self.target_name}"
            )
        agent = values.get("agent")
        if "agent" in values and agent not in self.agents:
            raise PermanentError(
                f"{self.label}: agent {agent!r} is not declared; declare it under agents: "
                f"or guard the route with `when: msg.to in agents`"
            )
        try:
            fields = encode(self.target.codec, out)
        except Exception as exc:  # RecursionError, a value JSON cannot hold: every time
            what = f"encoding for stream {self.target_name}"
            raise _failure(self.label, what, exc, False) from exc
        return Publish(key, fields)


class RouteTable:
    """All routes of a group, plus what the consumer needs to pick its fast path."""

    def __init__(
        self,
        group: ResolvedGroup,
        streams: Mapping[str, StreamSpec],
        agents: frozenset[str],
    ) -> None:
        self.routes = [
            CompiledRoute(i, r, streams, group, agents) for i, r in enumerate(group.spec.routes)
        ]
        self.agents = agents
        self.needs_context = any(r.needs_context for r in self.routes)
        # every action completes without a thread or socket: process whole batches inline
        self.inline = all(r.action in ("to", "drop") or r.inline for r in self.routes)
        # and nothing to await at all: EntryHandler.run_batch
        self.inline_sync = self.inline and not any(r.is_async for r in self.routes)
        # a sync call runs in a thread: its handlers all wait, so they start together
        self.threaded = any(
            r.action == "call" and not r.inline and not r.is_async for r in self.routes
        )
        # the table is one sync call and nothing else: no route steps to go through
        first = self.routes[0] if len(self.routes) == 1 else None
        self.only_call = (
            first
            if first is not None
            and first.action == "call"
            and not (first.inline or first.is_async)
            and first.when is None
            else None
        )


class Overran(TimeoutError):
    """A sync call ran past its timeout; raised once its thread returned (it cannot be
    killed), with how long it ran in all."""

    def __init__(self, timeout: float, ran: float) -> None:
        super().__init__(f"timed out after {timeout:g}s (it ran on for {ran:.1f}s in all)")
        self.timeout = timeout
        self.ran = ran


def call_inline(route: CompiledRoute, msg: Any) -> Any:
    """A sync ``call`` route run here (its value returned); SystemExit and the like are
    its failure."""
    try:
        return route.fn(msg)  # type: ignore[misc]
    except HANDLER_EXITS as exc:
        raise HandlerExit.of(route, exc) from None


async def call_route(
    route: CompiledRoute,
    msg: Any,
    executor: CallPool | None = None,
    on_overrun: Callable[[CompiledRoute], None] | None = None,
    deadlines: Deadlines | None = None,
) -> Any:
    """Run a ``call`` route: async awaited, sync in a thread (or inline), with its timeout.

    An async call is cancelled at its timeout. A sync call cannot be: past its timeout
    ``on_overrun`` is told, and this waits for the thread to return (the message keeps
    its slot and its lease, and is not retried meanwhile), then raises :class:`Overran`.
    Returns what the call returned.
    """
    try:
        return await _call(route, msg, executor, on_overrun, deadlines)
    except HANDLER_EXITS as exc:
        raise HandlerExit.of(route, exc) from None


async def _call(
    route: CompiledRoute,
    msg: Any,
    executor: CallPool | None,
    on_overrun: Callable[[CompiledRoute], None] | None,
    deadlines: Deadlines | None,
) -> Any:
    fn = route.fn
    assert fn is not None
    if route.is_async:
        if deadlines is not None:
            return await deadlines.run(fn, msg, route.timeout)
        async with asyncio.timeout(route.timeout):
            return await fn(msg)
    elif route.inline:
        return call_inline(route, msg)
    else:
        loop = asyncio.get_running_loop()
        started = loop.time()
        pool = executor or default_pool()
        call = pool.call(loop, fn, msg)
        waiter = call.waiter
        assert waiter is not None
        try:
            if deadlines is not None:
                return await deadlines.run(lambda _: waiter, None, route.timeout)
            async with asyncio.timeout(route.timeout):
                return await waiter
        except TimeoutError:
            if pool.cancel(call):
                raise  # still queued for a thread: it never ran
            if call.returned:  # in time, not handed back to the loop yet
                return await call.returning()
            pool.stuck(call)
            if on_overrun is not None:
                on_overrun(route)
            with contextlib.suppress(Exception, *HANDLER_EXITS):  # timed out either way
                await call.returning()
            raise Overran(route.timeout, loop.time() - started) from None
