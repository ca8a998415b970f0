"""OpenTelemetry traces across hops, with the ``cortex-flow[otel]`` extra.

Off unless configured: :func:`setup` (called once when a runner starts or a message is
sent) turns tracing on only when the standard ``OTEL_*`` variables ask for traces
(``OTEL_TRACES_EXPORTER`` other than ``none``, or an ``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT``)
and ``OTEL_SDK_DISABLED`` is not true; a program that set its own tracer provider calls
:func:`enable`. Off, nothing of opentelemetry is imported and the hot path is unchanged:
:func:`traced` hands back the group's handler as it is.

On:

- producers (:func:`inject`: ``Client.publish``, ``cortex-flow send``) add a W3C
  ``traceparent`` field to the entry, from a short ``send {stream}`` producer span;
- each message gets a ``process {stream}`` consumer span (OpenTelemetry messaging
  conventions: ``messaging.system`` ``redis``, ``messaging.destination.name``,
  ``messaging.consumer.group.name``, ``messaging.message.id``), linked to the producer's
  context, current while routes run so that handlers' own spans nest; ``to`` publishes
  carry its ``traceparent`` and ``http`` routes send it as a header; a retry and a dead
  letter are span events.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import MutableMapping
from typing import Any

__all__ = ["FIELD", "current_message", "enable", "enabled", "inject", "setup", "traced"]

log = logging.getLogger("cortex_flow.tracing")

FIELD = "traceparent"  # the entry field (and HTTP header) that carries the context
_EXPORTERS = ("OTEL_TRACES_EXPORTER",)
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_tracer: Any = None  # an opentelemetry Tracer once enabled; None: tracing is off
_checked = False


def enabled() -> bool:
    return _tracer is not None


def setup() -> bool:
    """Turn tracing on if the environment asks for it (once per process); True when on."""
    global _checked
    if _checked or _tracer is not None:
        return _tracer is not None
    _checked = True
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    asked = (exporter and exporter != "none") or any(os.environ.get(n) for n in _ENDPOINTS)
    if not asked:
        return False
    if importlib.util.find_spec("opentelemetry") is None:
        log.warning(
            "OTEL_* variables ask for traces but opentelemetry is not installed; "
            "pip install 'cortex-flow[otel]' (tracing stays off)"
        )
        return False
    enable(_provider(exporter or "otlp"))
    return True


def _provider(exporter: str) -> Any:
    """An SDK tracer provider (sampler and resource from OTEL_*) exporting to ``exporter``."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current  # the program configured its own
    provider = TracerProvider()
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            log.warning(
                "OTEL_TRACES_EXPORTER=otlp needs "
                "pip install opentelemetry-exporter-otlp-proto-http; spans are not exported"
            )
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported here; use otlp or console", exporter)
    trace.set_tracer_provider(provider)
    return provider


def enable(provider: Any = None) -> None:
    """Trace with ``provider`` (default: the global one); for programs and tests."""
    global _tracer, _checked
    from opentelemetry import trace

    from cortex_flow.version import __version__

    _checked = True
    source = provider if provider is not None else trace.get_tracer_provider()
    _tracer = source.get_tracer("cortex_flow", __version__)


def disable() -> None:
    """Tracing off again (tests)."""
    global _tracer
    _tracer = None


def inject(fields: MutableMapping[str, Any], destination: str) -> None:
    """Add ``traceparent`` to an entry about to be sent to ``destination`` (when tracing)."""
    if _tracer is None:
        return
    from opentelemetry import propagate, trace

    with _tracer.start_as_current_span(
        f"send {destination}",
        kind=trace.SpanKind.PRODUCER,
        attributes={"messaging.system": "redis", "messaging.destination.name": destination},
    ):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    if FIELD in carrier:
        fields[FIELD] = carrier[FIELD]


def current_message() -> dict[str, str]:
    """For log lines: the current ``trace_id`` and, while a message's routes run (its
    handlers' own spans included), its ``message_id``, ``group`` and ``stream``; empty
    when tracing is off."""
    if _tracer is None:
        return {}
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    from cortex_flow.runtime.tracespans import MESSAGE

    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    found = {"trace_id": f"{span_context.trace_id:032x}"}
    about = otel_context.get_value(MESSAGE)
    if isinstance(about, dict):
        found.update(about)
    return found


def traced(handler: Any) -> Any:
    """``handler`` with a consumer span per message when tracing is on; else itself."""
    if _tracer is None:
        return handler
    from cortex_flow.runtime.tracespans import TracedHandler

    return TracedHandler(handler, _tracer)
