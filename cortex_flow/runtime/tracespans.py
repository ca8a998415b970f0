"""The consumer span of each message: :class:`TracedHandler` wraps a group's EntryHandler.

Imported only when tracing is on (:func:`cortex_flow.runtime.tracing.traced`), so it may
import opentelemetry at the top. The wrapper stands in for the handler everywhere the
consumer uses it: it starts a ``process {stream}`` span when an entry's routes begin, makes
it current while they run (the route generator's steps, and the awaited calls of
:meth:`handle`), stamps the span's ``traceparent`` on the entry's ``to`` publishes, sends it
as a header on ``http`` routes, records a retry or dead letter as an event, and ends the
span with the outcome.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from cortex_flow.runtime.delivery import ACK, DEAD, RETRY, Acks, Entry, Outcome

__all__ = ["TracedHandler"]

FIELD = "traceparent"  # cortex_flow.runtime.tracing.FIELD (which imports this module)
# what JSON log lines read (tracing.current_message): the message whose routes run, kept in
# the OpenTelemetry context so that it holds inside handlers' own nested spans too
MESSAGE = otel_context.create_key("cortex_flow.message")

_OWN = frozenset(("_inner", "_tracer", "_spans", "_contexts", "_by_msg"))


def _parse(value: str | None) -> SpanContext | None:
    """A W3C ``traceparent`` (version 00) as a remote span context; None if invalid."""
    if value is None or len(value) != 55 or value[:3] != "00-":
        return None
    try:
        trace_id, span_id, flags = int(value[3:35], 16), int(value[36:52], 16), int(value[53:], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


class _TracingHttp:
    """The ``http`` routes' client with ``traceparent`` added from the current context."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", None) or {})
        propagate.inject(headers)
        return self.inner.request(method, url, headers=headers, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TracedHandler:
    """An :class:`~cortex_flow.runtime.handling.EntryHandler` with a span per message."""

    def __init__(self, inner: Any, tracer: Any) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_spans", {})  # id(entry) -> span, while its routes run
        object.__setattr__(self, "_contexts", {})  # id(entry) -> the context to attach
        object.__setattr__(self, "_by_msg", {})  # id(msg) -> that context, while it waits
        if inner.http is not None and not isinstance(inner.http, _TracingHttp):
            inner.http = _TracingHttp(inner.http)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        elif name == "http" and value is not None and not isinstance(value, _TracingHttp):
            setattr(self._inner, name, _TracingHttp(value))
        else:
            setattr(self._inner, name, value)

    # --- spans ---------------------------------------------------------------------------

    def _start(self, entry: Entry) -> Any:
        producer = _parse(entry.fields.get(FIELD))
        parent = trace.set_span_in_context(NonRecordingSpan(producer)) if producer else None
        links = [Link(producer)] if producer is not None else []
        # the producer's trace continues here: a parent (so one trace runs from `send`
        # through every hop) and, as the messaging conventions ask, a link to it
        span = self._tracer.start_span(
            f"process {entry.key.stream}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.destination.name": entry.key.key,
                "messaging.consumer.group.name": self._inner.name,
                "messaging.message.id": entry.id,
                "messaging.message.delivery_count": entry.deliveries,
            },
        )
        self._spans[id(entry)] = span
        about = {"message_id": entry.id, "group": self._inner.name, "stream": entry.key.key}
        context = otel_context.set_value(MESSAGE, about, trace.set_span_in_context(span))
        self._contexts[id(entry)] = context
        return context

    def _end(self, entry: Entry, outcome: Outcome) -> Outcome:
        span = self._spans.pop(id(entry), None)
        self._contexts.pop(id(entry), None)
        if span is None:
            return outcome
        if outcome.publishes:
            context = span.get_span_context()
            parent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
            for publish in outcome.publishes:
                if not publish.mode:  # a stream publish; not a reply or task state
                    publish.fields[FIELD] = parent
        if outcome.kind == RETRY:
            span.add_event("retry", {"error": outcome.error, "deliveries": entry.deliveries})
        elif outcome.kind == DEAD:
            span.add_event("dead_letter", {"error": outcome.error})
        if outcome.error:
            span.set_status(Status(StatusCode.ERROR, outcome.error))
        span.end()
        return outcome

    def _abandon(self, entry: Entry, exc: BaseException) -> None:
        span = self._spans.pop(id(entry), None)
        self._contexts.pop(id(entry), None)
        if span is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()

    def _attached(self, entry: Entry) -> Any:
        context = self._contexts.get(id(entry))
        return otel_context.attach(context) if context is not None else None

    # --- the handler's faces -------------------------------------------------------------

    def steps(self, entry: Entry) -> Generator[Any, None, Outcome]:
        self._start(entry)
        waiting: set[int] = set()  # the ids of this entry's msgs in _by_msg
        try:
            return (yield from self._steps(entry, waiting))
        finally:
            for key in waiting:
                self._by_msg.pop(key, None)

    def _steps(self, entry: Entry, waiting: set[int]) -> Generator[Any, None, Outcome]:
        inner = self._inner.steps(entry)
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            token = self._attached(entry)
            try:
                step = inner.throw(thrown) if thrown is not None else inner.send(sent)
            except StopIteration as stop:
                return self._end(entry, stop.value)
            except BaseException as exc:  # not a route's failure: the consumer logs it
                self._abandon(entry, exc)
                raise
            finally:
                if token is not None:
                    otel_context.detach(token)
            thrown, sent = None, None
            # the sync-call driver posts http routes itself: post() finds the span by msg
            self._by_msg[id(step[1])] = self._contexts.get(id(entry))
            waiting.add(id(step[1]))
            try:
                sent = yield step
            except Exception as exc:
                thrown = exc

    def run_batch(self, entries: list[Entry], acks: list[Acks]) -> list[Outcome]:
        """The inner batch one entry at a time, each inside its span (tracing is on: the
        span per message costs more than the batch saves)."""
        outcomes: list[Outcome] = []
        for entry in entries:
            token = otel_context.attach(self._start(entry))
            done: list[Acks] = []
            try:
                got: list[Outcome] = self._inner.run_batch([entry], done)
            except BaseException as exc:
                self._abandon(entry, exc)
                raise
            finally:
                otel_context.detach(token)
            for outcome in got:
                outcomes.append(self._end(entry, outcome))
            for ack in done:  # a plain acknowledgement: joined to the last of its key
                self._end(entry, Outcome(entry, ACK, []))
                if acks and acks[-1].key == ack.key:
                    acks[-1].entries += ack.entries
                    acks[-1].retried += ack.retried
                else:
                    acks.append(ack)
        return outcomes

    def wrap_call(self, entry: Entry, fn: Any) -> Any:
        """``fn`` run in a call thread with ``entry``'s span current, so the spans a sync
        handler makes nest under its message's."""
        context = self._contexts.get(id(entry))
        if context is None:
            return fn

        def in_span(msg: Any) -> Any:
            token = otel_context.attach(context)
            try:
                return fn(msg)
            finally:
                otel_context.detach(token)

        return in_span

    async def handle(self, entry: Entry, task: Any = None) -> Outcome:
        token = otel_context.attach(self._start(entry))  # the awaited calls run in its span
        try:
            outcome: Outcome = await self._inner.handle(entry, task)
        except BaseException as exc:
            self._abandon(entry, exc)
            raise
        finally:
            otel_context.detach(token)
        return self._end(entry, outcome)

    def message(self, entry: Entry) -> Any:
        """A table of one sync call: the span starts as its call is queued."""
        self._start(entry)
        msg = self._inner.message(entry)
        if isinstance(msg, Outcome):
            return self._end(entry, msg)
        return msg

    def called(
        self, entry: Entry, route: Any, error: Exception | None, seconds: float, value: Any = None
    ) -> Outcome:
        outcome: Outcome = self._inner.called(entry, route, error, seconds, value)
        return self._end(entry, outcome)

    async def post(self, route: Any, msg: Any, ctx: Any) -> Any:
        """An ``http`` route made by the sync-call driver, inside its message's span."""
        context = self._by_msg.get(id(msg))
        token = otel_context.attach(context) if context is not None else None
        try:
            return await self._inner.post(route, msg, ctx)
        finally:
            if token is not None:
                otel_context.detach(token)
