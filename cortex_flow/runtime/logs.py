"""Logging set-up: text for people, JSON lines for log pipelines.

A JSON line carries, where there is one, the ``message_id``, ``group`` and ``stream`` it is
about and the ``trace_id`` of the trace it belongs to. They come from, in order: ``extra=``
given to the log call; the consumer's own wording, ``"group %s: %s from %s ..."`` (group,
message ID, stream key) or ``"group %s: ..."``; and, with tracing on, the message span
that is current (a handler's own log lines inside its ``process`` span).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from cortex_flow.runtime import tracing

CONTEXT = ("message_id", "group", "stream", "trace_id")
_ABOUT_GROUP = "group %s:"
_ABOUT_MESSAGE = "group %s: %s from %s"


def record_context(record: logging.LogRecord) -> dict[str, str]:
    """What ``record`` is about: message ID, group, stream, trace ID (those known)."""
    found = {k: str(v) for k in CONTEXT if (v := getattr(record, k, None)) is not None}
    args: Any = record.args
    if isinstance(record.msg, str) and isinstance(args, tuple) and args:
        if record.msg.startswith(_ABOUT_MESSAGE) and len(args) >= 3:
            found.setdefault("message_id", str(args[1]))
            found.setdefault("stream", str(args[2]))
        if record.msg.startswith(_ABOUT_GROUP):
            found.setdefault("group", str(args[0]))
    for key, value in tracing.current_message().items():
        found.setdefault(key, value)
    return found


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(record_context(record))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # "1 change detected" is noise
