"""``cortex-flow send STREAM JSON``: publish one message the way the flows name it.

``--ttl 30s`` gives it a deadline; ``--wait [TIMEOUT]`` sends it as a request and prints
the reply as JSON (exit 0; a streaming handler's parts one line each), the failure
(exit 1) or that it timed out (exit 124).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from cortex_flow.client import Client
from cortex_flow.errors import (
    CortexFlowError,
    RequestCanceled,
    RequestFailed,
    RequestTimeout,
    UsageError,
)
from cortex_flow.flow.durations import parse_duration
from cortex_flow.flow.loader import Project, load_project
from cortex_flow.flow.models import StreamSpec
from cortex_flow.ops.later import delay_of, publish_later, publish_once, window_of
from cortex_flow.ops.requests import seconds
from cortex_flow.ops.send import TargetError, publish, target_key
from cortex_flow.wire.access import connect_project
from cortex_flow.wire.replies import PART

log = logging.getLogger("cortex_flow.send")

# what the library's target errors are about -> the flag that gives it
FLAGS = {"priority": "--priority", "agent": "--agent", "var": "--var"}

# `send --wait` when no reply came in time (as timeout(1) does)
EXIT_TIMEOUT = 124


def target(
    project: Project, args: argparse.Namespace, msg: dict[str, Any] | None = None
) -> tuple[str, StreamSpec, dict[str, str]]:
    """The key ``args`` name (stream, --priority, --agent, --var), its spec and the vars;
    ``msg`` picks a partitioned stream's partition."""
    bad = [v for v in args.var if "=" not in v]
    if bad:
        raise UsageError(f"--var takes NAME=VALUE, got {bad[0]!r}")
    extra = dict(v.split("=", 1) for v in args.var)
    try:
        key, spec = target_key(
            project, args.stream, priority=args.priority, agent=args.agent, extra=extra, msg=msg
        )
    except TargetError as exc:
        raise UsageError(_with_flags(exc)) from None
    names = dict(extra)
    if args.priority is not None:
        names["priority"] = args.priority
    if args.agent is not None:
        names["agent"] = args.agent
    return key, spec, names


def _duration(value: Any, flag: str) -> float:
    try:
        return seconds(value, flag)
    except CortexFlowError as exc:
        raise UsageError(str(exc)) from None


def command(args: argparse.Namespace) -> int:
    project = load_project(args.config)
    try:
        msg = json.loads(args.json)
    except ValueError as exc:
        raise UsageError(f"JSON argument is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise UsageError('JSON argument must be an object, e.g. \'{"type": "chat"}\'')
    key, spec, names = target(project, args, msg)
    ttl = _duration(args.ttl, "--ttl") if args.ttl is not None else None
    hold = later(args)
    if args.wait is not None:
        if hold is not None or args.idempotency_key:
            raise UsageError("--wait sends a request now: drop --delay, --at and --idempotency-key")
        return _request(project, args.stream, msg, _duration(args.wait, "--wait"), ttl, names)
    if ttl is not None and (hold is not None or args.idempotency_key):
        raise UsageError(
            "--ttl goes with a message sent now: drop --delay, --at and --idempotency-key, or --ttl"
        )

    async def go() -> str:
        client = await connect_project(project, wait=3.0, log=log)
        try:
            if hold is not None:
                held = await publish_later(client, project, key, spec, msg, hold)
                due = datetime.fromtimestamp(held.due_ms / 1000, UTC).isoformat()
                return f"delayed {held.id} for {key} until {due}"
            if args.idempotency_key:
                window = window_of(project, args.stream)
                found = await publish_once(client, key, spec, msg, args.idempotency_key, window)
                return f"sent {found} to {key}"
            return f"sent {await publish(client, key, spec, msg, ttl=ttl)} to {key}"
        finally:
            await client.aclose()

    print(asyncio.run(go()))
    return 0


def _request(
    project: Project,
    stream: str,
    msg: dict[str, Any],
    timeout: float,
    ttl: float | None,
    names: dict[str, str],
) -> int:
    async def go() -> None:
        redis = await connect_project(project, wait=3.0, log=log)
        client = Client(project, redis, owns=True)
        parts = 0
        try:
            # a streaming handler's parts one JSON line each as they come; else the reply
            exchange = client.stream(stream, msg, timeout=timeout, ttl=ttl, raw=True, **names)
            async for reply in exchange:
                if reply.kind == PART:
                    parts += 1
                    print(json.dumps(reply.data, ensure_ascii=False), flush=True)
                elif not parts:
                    print(json.dumps(reply.data, ensure_ascii=False))
        finally:
            await client.aclose()

    try:
        asyncio.run(go())
    except RequestTimeout as exc:
        print(f"timed out: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except (RequestFailed, RequestCanceled) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    return 0


def later(args: argparse.Namespace) -> float | None:
    """Seconds to hold the message from ``--delay`` or ``--at``; None to send now."""
    delay, at = getattr(args, "delay", None), getattr(args, "at", None)
    if delay is not None and at is not None:
        raise UsageError("give --delay or --at, not both")
    if getattr(args, "idempotency_key", None) and (delay is not None or at is not None):
        raise UsageError("--idempotency-key applies to a message sent now; drop --delay/--at")
    if delay is not None:
        try:
            return parse_duration(delay)
        except ValueError as exc:
            raise UsageError(f"--delay {exc}") from None
    if at is not None:
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            raise UsageError(
                f"--at takes an ISO 8601 time such as 2026-05-01T09:00:00Z, got {at!r}"
            ) from None
        if when.tzinfo is None:
            when = when.astimezone()  # a time without a zone is local time
        return delay_of(None, when)
    return None


def _with_flags(exc: TargetError) -> str:
    """The library's words, with the flag that gives what is missing."""
    text = str(exc)
    if exc.about == "priority":
        return f"--{text}"
    if exc.about == "agent":
        return text.replace("name the agent", "give --agent")
    if exc.about == "var":
        return text.split(" needs ")[0] + f" needs --var {exc.choices[0]}=VALUE"
    return text
