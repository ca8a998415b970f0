"""`log.format: json`: one JSON object per line, with the message it is about."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from projects import running, wait_for

from cortex_flow.client import Client
from cortex_flow.runtime.logs import JsonFormatter, setup_logging

FLOWS = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      dlq: {key: "{P}dlq"}
    groups:
      workers:
        stream: tasks
        dead_letter: dlq
        retry: {max_deliveries: 1}
        routes:
          - call: {M}:work
"""

HANDLERS = """
    import logging

    def work(msg):
        logging.getLogger("agent").info("working on %s", msg["task"])
        raise ValueError("no good")
"""


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything logged meanwhile, formatted as the JSON lines `log.format: json` writes."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_a_dead_letter_line_names_its_message_group_and_stream(
    new_project: Any, json_lines: io.StringIO, r: Any, prefix: str
) -> None:
    """The consumer's line about a message carries message_id, group and stream as fields."""
    config, _ = new_project(FLOWS, HANDLERS)
    async with running(config), Client.from_config(config) as client:
        sent = await client.publish("tasks", {"task": "t1"})
        await wait_for(lambda: r.xlen(f"{prefix}dlq") == 1, what="the dead letter")
        await wait_for(
            lambda: any("dead-lettered" in x["msg"] for x in _lines(json_lines)), what="the line"
        )
    line = next(x for x in _lines(json_lines) if "dead-lettered" in x["msg"])
    assert line["level"] == "warning"
    assert (line["message_id"], line["group"], line["stream"]) == (
        sent,
        "workers",
        f"{prefix}tasks",
    )
    assert "trace_id" not in line  # tracing is off


def test_setup_writes_one_json_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Every record is one line of JSON on stderr; explicit extras become fields too."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info", "json")
        log = logging.getLogger("cortex_flow.test")
        log.info("plain line\nwith a newline")
        log.info("about one", extra={"message_id": "1-0", "group": "g", "stream": "s"})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["msg"] == "plain line\nwith a newline" and first["logger"] == "cortex_flow.test"
    assert {k: second[k] for k in ("message_id", "group", "stream")} == {
        "message_id": "1-0",
        "group": "g",
        "stream": "s",
    }
