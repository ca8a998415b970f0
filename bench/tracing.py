"""Benchmark: the throughput cost of tracing (the ``cortex-flow[otel]`` extra).

The ``route`` flow (``when`` + ``to``, batch 100) three ways: tracing off (the default:
nothing is wrapped), on with every span sampled (recorded and handed to a batch
processor whose exporter discards them), and on with nothing sampled (spans made but not
recorded; ``traceparent`` still carried). Informational: no target, the ratios to "off".
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from bench.common import Figure, Server, create_groups, preload, project, run_cortex, wait_acked
from bench.route import FLOW, SOURCE, TARGET_KEY
from cortex_flow.runtime import tracing

MODES = ("off", "sampled", "unsampled")


def _provider(mode: str) -> Any:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ALWAYS_ON if mode == "sampled" else ALWAYS_OFF)
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    return provider


async def _cortex(server: Server, last: dict[str, str]) -> float:
    client = server.aclient()
    try:
        with project(server, FLOW) as proj:
            return (await run_cortex(proj, lambda: wait_acked(client, last))).seconds
    finally:
        await client.aclose()


def run(server: Server, messages: int, repeat: int) -> list[Figure]:
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        return [
            Figure("tracing", "skipped: pip install 'cortex-flow[otel]'", 0, "", None, "", None)
        ]
    best: dict[str, float] = {}
    for _ in range(repeat):
        for mode in MODES:
            server.flush()
            with server.client() as client:
                create_groups(client, [SOURCE])
                last = preload(client, {SOURCE: messages})
            provider = None if mode == "off" else _provider(mode)
            if provider is not None:
                tracing.enable(provider)
            try:
                seconds = asyncio.run(_cortex(server, last))
            finally:
                tracing.disable()
                if provider is not None:
                    provider.shutdown()
            with server.client() as client:
                published = client.xlen(TARGET_KEY)
            if published != messages:
                raise RuntimeError(f"tracing ({mode}): {published} published, not {messages}")
            best[mode] = max(best.get(mode, 0.0), messages / seconds)
    return [
        Figure(
            "tracing", "msg/s, route, tracing off", best["off"], "", None, "informational", None
        ),
        *(
            Figure(
                "tracing",
                f"msg/s, route, tracing on ({mode})",
                best[mode],
                "tracing off",
                best["off"],
                "informational",
                None,
            )
            for mode in ("sampled", "unsampled")
        ),
    ]
