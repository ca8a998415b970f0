"""Stand-ins a test run puts in place of call targets, the HTTP client and fakeredis quirks.

Used by :class:`cortex_flow.testing.FlowHarness`; every stand-in records what it got in a
shared list of :class:`Called`, one entry per delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any, Literal, Self

from cortex_flow.flow.checks import resolve_callable
from cortex_flow.wire.connection import ENCODING_ERRORS

__all__ = ["Called", "HandlerFailed", "StubHttp", "fake_client", "make_resolver"]

Handler = str | Callable[..., Any]


class HandlerFailed(Exception):
    """Raised by a call target stubbed with ``"fail"``."""


@dataclasses.dataclass(frozen=True)
class Called:
    """One delivery to a ``call`` target (``kind="call"``) or an ``http`` route (the URL)."""

    kind: Literal["call", "http"]
    target: str
    msg: dict[str, Any]


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


def _stub(kind: str) -> Callable[..., Any]:
    async def ok(msg: Any) -> None:
        return None

    async def fail(msg: Any) -> None:
        raise HandlerFailed("stubbed failure (handler set to fail)")

    return ok if kind == "ok" else fail


def _recording(target: str, fn: Callable[..., Any], calls: list[Called]) -> Callable[..., Any]:
    """``fn`` that first records the message; async stays async (the runner checks)."""
    if _is_async(fn):

        async def async_wrapper(msg: Any) -> Any:
            calls.append(Called("call", target, dict(msg)))
            return await fn(msg)

        return async_wrapper

    def wrapper(msg: Any) -> Any:
        calls.append(Called("call", target, dict(msg)))
        return fn(msg)

    return wrapper


def make_resolver(
    handlers: Mapping[str, Handler], calls: list[Called]
) -> Callable[[str], Callable[..., Any]]:
    """What :data:`cortex_flow.runtime.routes.call_resolver` is set to while the runner compiles."""

    def resolver(target: str) -> Callable[..., Any]:
        given = handlers.get(target)
        if given is None:
            found = resolve_callable(target)
        elif callable(given):
            found = given
        elif given in ("ok", "fail"):
            found = _stub(given)
        else:
            try:
                found = resolve_callable(given)
            except (ImportError, AttributeError, TypeError) as exc:
                raise ImportError(f"handlers: {given} (replacing {target}): {exc}") from None
        assert callable(found)
        return _recording(target, found, calls)

    return resolver


# what a stubbed a2a route's agent answers: a completed task without artifacts
_STUB_TASK = {
    "jsonrpc": "2.0",
    "result": {"kind": "task", "id": "stub", "contextId": "stub", "status": {"state": "completed"}},
}


class _StubResponse:
    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body

    async def text(self) -> str:
        return self.body

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class StubHttp:
    """Stands in for the runner's aiohttp session: answers 200 (``ok``) or 503 (``fail``)."""

    def __init__(self, mode: Literal["ok", "fail"], calls: list[Called]) -> None:
        self.mode = mode
        self.calls = calls

    def request(self, method: str, url: str, **kwargs: Any) -> _StubResponse:
        body = dict(kwargs.get("json") or {})
        rpc = body.get("jsonrpc") == "2.0"  # an a2a route: its message's fields were sent
        sent = body["params"]["message"]["parts"][0]["data"] if rpc else body
        self.calls.append(Called("http", url, sent))
        if self.mode == "ok":
            return _StubResponse(
                200, json.dumps(_STUB_TASK | {"id": body.get("id")}) if rpc else ""
            )
        return _StubResponse(503, "stubbed failure (http set to fail)")

    async def close(self) -> None:
        return None


def fake_client() -> Any:
    from fakeredis.aioredis import FakeRedis

    class TestFake(FakeRedis):
        """fakeredis as the runner needs it in tests.

        XREADGROUP BLOCK returns at once there: wait a little, as a server would. Its Lua
        XREADGROUP replies in another shape, so the consumer's script would fail *after*
        taking entries: no scripts at all (the consumer then reads key by key and commits
        with MULTI/EXEC, without warning that scripts cannot run).
        """

        async def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
            reply = await super().xreadgroup(*args, **kwargs)
            if not reply and kwargs.get("block"):
                await asyncio.sleep(min(int(kwargs["block"]), 20) / 1000)
            return reply

        def register_script(self, script: Any) -> Any:
            return None

    return TestFake(decode_responses=True, encoding_errors=ENCODING_ERRORS)
