"""Traces across hops: `send` -> a router group -> an agent's handler, in one trace."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from projects import module, running, wait_for

from cortex_flow.client import Client
from cortex_flow.runtime import tracing

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="pip install 'cortex-flow[otel]'")

FLOWS = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      inbox: {key: "{P}inbox:{{ agent }}"}
      dlq: {key: "{P}dlq"}
    agents: {coder: {}}
    groups:
      router:
        stream: tasks
        routes:
          - to: inbox
            vars: {agent: coder}
      coder:
        stream: inbox
        vars: {agent: coder}
        dead_letter: dlq
        retry: {max_deliveries: 2, backoff: {initial: 10ms, max: 10ms}}
        routes:
          - call: {M}:work
"""

HANDLERS = """
    from opentelemetry import trace

    done = []

    async def work(msg):
        with trace.get_tracer("agent").start_as_current_span("agent work"):
            if msg.get("fail"):
                raise RuntimeError("cannot do " + msg["fail"])
            done.append(msg["task"])
"""


_EXPORTER: list[Any] = []  # one in-memory exporter per process, on the global provider


@pytest.fixture
def spans() -> Iterator[Any]:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if not _EXPORTER:
        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            trace.set_tracer_provider(TracerProvider())  # handlers' own spans use it too
        provider: Any = trace.get_tracer_provider()
        _EXPORTER.append(InMemorySpanExporter())
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER[0]))
    exporter = _EXPORTER[0]
    exporter.clear()
    tracing.enable(trace.get_tracer_provider())
    try:
        yield exporter
    finally:
        tracing.disable()
        exporter.clear()


async def test_one_trace_runs_from_send_through_the_router_to_the_agents_handler(
    new_project: Any, spans: Any, prefix: str
) -> None:
    """Producer, both consumer spans and the handler's own span share one trace, nested."""
    config, mod = new_project(FLOWS, HANDLERS)
    async with running(config), Client.from_config(config) as client:
        sent = await client.publish("tasks", {"task": "t1"})
        await wait_for(lambda: module(mod).done == ["t1"], what="the handler")
        await wait_for(lambda: len(spans.get_finished_spans()) >= 4, what="four spans")
    by_name = {s.name: s for s in spans.get_finished_spans()}
    send = by_name[f"send {prefix}tasks"]
    router = by_name["process tasks"]
    agent = by_name["process inbox"]
    work = by_name["agent work"]
    trace_ids = {s.context.trace_id for s in (send, router, agent, work)}
    assert len(trace_ids) == 1
    assert router.parent.span_id == send.context.span_id
    assert agent.parent.span_id == router.context.span_id
    assert work.parent.span_id == agent.context.span_id  # the handler's span nests
    assert [link.context.span_id for link in agent.links] == [router.context.span_id]
    assert router.kind.name == "CONSUMER" and send.kind.name == "PRODUCER"
    assert dict(router.attributes) == {
        "messaging.system": "redis",
        "messaging.operation.type": "process",
        "messaging.destination.name": f"{prefix}tasks",
        "messaging.consumer.group.name": "router",
        "messaging.message.id": sent,
        "messaging.message.delivery_count": 1,
    }
    assert agent.attributes["messaging.destination.name"] == f"{prefix}inbox:coder"


async def test_retries_and_dead_letters_are_span_events(
    new_project: Any, spans: Any, r: Any, prefix: str
) -> None:
    """A failing delivery records a retry event; the last one a dead_letter event, as errors."""
    config, _ = new_project(FLOWS, HANDLERS)
    async with running(config), Client.from_config(config) as client:
        await client.publish("tasks", {"task": "t2", "fail": "t2"})
        await wait_for(lambda: r.xlen(f"{prefix}dlq") == 1, what="the dead letter")
        await wait_for(
            lambda: len([s for s in spans.get_finished_spans() if s.name == "process inbox"]) == 2,
            what="two deliveries",
        )
    deliveries = [s for s in spans.get_finished_spans() if s.name == "process inbox"]
    events = [[e.name for e in s.events] for s in deliveries]
    assert events == [["retry"], ["dead_letter"]]
    assert all(s.status.status_code.name == "ERROR" for s in deliveries)
    assert "cannot do t2" in deliveries[1].events[0].attributes["error"]
    assert len({s.context.trace_id for s in deliveries}) == 1  # both continue the send's trace


def _run_once(config: Path, hide_otel: bool) -> list[str]:
    """Run a runner and a send in a fresh interpreter; what it imported, in short."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        if {hide_otel!r}:  # as if cortex-flow[otel] were not installed
            class Hide:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] == "opentelemetry":
                        raise ModuleNotFoundError(name)
            sys.meta_path.insert(0, Hide())
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from projects import running, wait_for
        from cortex_flow.client import Client

        async def main():
            config = Path({str(config)!r})
            async with running(config) as runner, Client.from_config(config) as c:
                await c.publish("tasks", {{"task": "x"}})
                stats = runner.stats.groups
                await wait_for(lambda: "coder" in stats and any(
                    k.processed for k in stats["coder"].keys.values()))
                print(type(runner.consumers["coder"].handler).__name__)
        asyncio.run(main())
        print("otel" if any(m.startswith("opentelemetry") for m in sys.modules) else "no otel")
        print("tracespans" if "cortex_flow.runtime.tracespans" in sys.modules else "no spans")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_without_the_extra_nothing_of_opentelemetry_is_imported(new_project: Any) -> None:
    """Without opentelemetry installed, a runner and a send run untraced and import none of it."""
    config, _ = new_project(FLOWS.replace("call: {M}:work", "drop: true"))
    assert _run_once(config, hide_otel=True) == ["EntryHandler", "no", "otel", "no", "spans"]


def test_without_otel_variables_the_handler_is_not_wrapped(new_project: Any) -> None:
    """With the extra installed but no OTEL_* asking for traces, the hot path is unchanged."""
    config, _ = new_project(FLOWS.replace("call: {M}:work", "drop: true"))
    # redis-py itself imports opentelemetry when it is installed; cortex-flow adds nothing
    out = _run_once(config, hide_otel=False)
    assert (out[0], out[-2:]) == ("EntryHandler", ["no", "spans"])


@pytest.mark.parametrize("before", ["", "- call: {M}:noop\n                continue: true"])
async def test_http_routes_send_the_message_span_as_traceparent(
    new_project: Any, spans: Any, prefix: str, before: str
) -> None:
    """The POST of an http route carries the consumer span's context in its header, also
    in a group with sync calls (their driver makes the POST)."""
    from aiohttp import web

    headers: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        headers.append(request.headers.get("traceparent", ""))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = web.AppRunner(app)
    await server.setup()
    await web.TCPSite(server, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.addresses[0][1]}"
    config, _ = new_project(
        f"""
        version: 1
        streams:
          events: {{key: "{{P}}events"}}
        groups:
          bridge:
            stream: events
            routes:
              {before}
              - http: {{url: "{base}/hook", timeout: 5s}}
        """,
        "def noop(msg):\n    pass\n",
    )
    try:
        async with running(config), Client.from_config(config) as client:
            await client.publish("events", {"n": "1"})
            await wait_for(lambda: headers, what="the POST")
            await wait_for(
                lambda: any(s.name == "process events" for s in spans.get_finished_spans()),
                what="the span",
            )
    finally:
        await server.cleanup()
    span = next(s for s in spans.get_finished_spans() if s.name == "process events")
    trace_id, span_id = f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"
    assert len(headers) == 1
    assert headers[0].split("-")[:3] == ["00", trace_id, span_id]


async def test_a_handlers_json_log_lines_carry_the_trace_and_message(
    new_project: Any, spans: Any, prefix: str
) -> None:
    """Logged inside the message's span: trace_id, message_id, group and stream are fields."""
    import io
    import json
    import logging

    from cortex_flow.runtime.logs import JsonFormatter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("agent").addHandler(handler)
    handlers = HANDLERS.replace(
        "done.append", 'logging.getLogger("agent").warning("done"); done.append'
    ).replace(
        "from opentelemetry import trace", "import logging\n    from opentelemetry import trace"
    )
    config, mod = new_project(FLOWS, handlers)
    try:
        async with running(config), Client.from_config(config) as client:
            await client.publish("tasks", {"task": "t3"})
            await wait_for(lambda: module(mod).done == ["t3"], what="the handler")
            await wait_for(
                lambda: any(s.name == "process inbox" for s in spans.get_finished_spans()),
                what="the span",
            )
    finally:
        logging.getLogger("agent").removeHandler(handler)
    line = json.loads(out.getvalue().splitlines()[0])
    span = next(s for s in spans.get_finished_spans() if s.name == "process inbox")
    assert line["trace_id"] == f"{span.context.trace_id:032x}"
    assert line["message_id"] == span.attributes["messaging.message.id"]
    assert (line["group"], line["stream"]) == ("coder", f"{prefix}inbox:coder")


def test_send_traces_when_the_otel_variables_ask(new_project: Any, r: Any, prefix: str) -> None:
    """`cortex-flow send` with OTEL_TRACES_EXPORTER=console: a producer span, and the entry
    carries its traceparent."""
    config, _ = new_project(FLOWS.replace("call: {M}:work", "drop: true"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "sender"}
    done = subprocess.run(
        [sys.executable, "-m", "cortex_flow", "send", "--config", str(config), "tasks", "{}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    ((_, fields),) = r.xrange(f"{prefix}tasks")
    assert f'"name": "send {prefix}tasks"' in done.stdout
    trace_id = fields["traceparent"].split("-")[1]
    assert f'"trace_id": "0x{trace_id}"' in done.stdout
    assert '"service.name": "sender"' in done.stdout
