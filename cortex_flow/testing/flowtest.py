"""``cortex-flow test [PATHS]``: run flow test files (``*.test.yaml``) against the real routing.

Test files live next to the flows (``flows/*.test.yaml``) or in ``tests/flows/`` beside
``config.yaml``; PATHS may name files or folders instead. The flows loader skips
``*.test.yaml``, so tests never become part of the topology. A file::

    version: 1
    cases:
      - name: direct message goes to the agent's inbox
        send:                       # published in order, after the runner started
          - {stream: tasks, priority: high, msg: {to: harold, text: hi}}
        expect:                     # entries that must be on a stream; msg is a subset match
          - {stream: inbox, agent: harold, msg: {to: harold, text: hi}}
        calls:                      # optional: call targets / http routes that got a message
          - {call: agents_example.harold:handle, msg: {text: hi}}
          - {http: "127.0.0.1:9000", msg: {type: chat}}     # http: text the URL contains
        dead_letters: []            # default []: exactly these dead letters, each
                                    #   {error: substring, group: name, msg: {...}}
        pending: 0                  # default 0: entries left unacknowledged at the end
        handlers:                   # optional: replace call targets for this case
          agents_example.harold:handle: ok      # ok | fail | other.module:function
        http: ok                    # http and a2a routes answer ok (default) or fail; no network
        timeout: 5s                 # default 5s: longest wait for the routing to settle

``stream`` names a declared stream; ``priority`` (default ``normal``), ``agent`` and
``vars`` pick its key, as with ``cortex-flow send``. ``msg`` values are compared as the
stream's codec stores them (a raw stream holds strings: ``n: 1`` matches ``"1"``).

How a case runs: a :class:`~cortex_flow.runtime.runner.Runner` (the production consumer and
routing code) starts on a private ``redis-server`` shared by the whole run and emptied
(FLUSHDB) before each case, or on ``--url`` (then only the keys the flows and the case
name are deleted: use a server meant for tests). ``call`` routes import and run the real
callables unless ``handlers:`` replaces them. The case's messages are sent; the case
ends when routing is over (checked twice in a row): every group has read everything and
every entry still pending is stuck for good (its group has no ``dead_letter`` and the
entry used up ``max_deliveries``), or at ``timeout``; then the expectations are checked.

Retries are fast in tests: every group's backoff is 10ms and ``claim_idle`` at most
0.5s, so a case expecting a dead letter after ``max_deliveries`` attempts finishes in
well under a second (``max_deliveries`` is kept as written).

Output: ``PASS name`` or ``FAIL name`` with what differs (a diff of expected and closest
actual fields) and the runner's warnings; the last line is ``N passed, M failed``. Exit
0 when all pass, 1 otherwise. ``--format github`` adds ``::error`` annotations at the
failing cases' lines.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cortex_flow.errors import CortexFlowError, ValidationFailed
from cortex_flow.flow.loader import Project
from cortex_flow.flow.report import escape_annotation
from cortex_flow.flow.testfile import LoadedCase
from cortex_flow.flow.topology import resolve
from cortex_flow.ops.send import publish
from cortex_flow.testing.expectations import CaseCheck
from cortex_flow.testing.harness import FlowHarness, private_redis
from cortex_flow.wire.connection import redis_from_url, wait_for_redis

__all__ = ["CaseResult", "render", "run_cases"]

LOG_LINES = 12
log = logging.getLogger("cortex_flow.flowtest")


@dataclass
class CaseResult:
    loaded: LoadedCase
    failures: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@contextlib.contextmanager
def _captured_logs() -> Iterator[list[str]]:
    """Collect cortex_flow warnings instead of printing them; shown for failed cases."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname.lower()}: {record.getMessage()}")

    logger = logging.getLogger("cortex_flow")
    handler = Collect(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


# -- checking ------------------------------------------------------------------------------


async def _clear(client: Any, private: bool, project: Project, loaded: LoadedCase) -> None:
    if private:
        await client.flushdb()
        return
    keys = set(resolve(project.topology, "test").keys()) | loaded.keys
    await client.delete(*sorted(keys))


async def run_case(project: Project, loaded: LoadedCase, url: str) -> CaseResult:
    """Run one case on a cleared server: start a runner, send, settle, check."""
    result = CaseResult(loaded)
    case = loaded.case
    with _captured_logs() as lines:
        try:
            async with FlowHarness(project, url=url, handlers=case.handlers, http=case.http) as h:
                for (key, spec), step in zip(loaded.sends, case.send, strict=True):
                    await publish(h.client, key, spec, step.msg)
                settled = await h.settle(case.timeout)
                result.failures = await CaseCheck(h, loaded).run(settled)
        except ValidationFailed as exc:
            result.failures.append(f"the runner refused to start: {exc}")
        except CortexFlowError as exc:
            result.failures.append(f"error: {exc}")
    result.logs = lines[-LOG_LINES:]
    return result


@contextlib.asynccontextmanager
async def _server(url: str | None) -> AsyncIterator[str]:
    if url is not None:
        yield url
    else:
        async with private_redis() as private:
            yield private


async def run_cases(
    project: Project, cases: Sequence[LoadedCase], url: str | None = None
) -> AsyncIterator[CaseResult]:
    """Run ``cases`` one after another on one server (private unless ``url``)."""
    async with _server(url) as where:
        client = redis_from_url(where)
        try:
            await wait_for_redis(client, timeout=5.0, log=log)
            for loaded in cases:
                await _clear(client, url is None, project, loaded)
                yield await run_case(project, loaded, where)
        finally:
            await client.aclose()


# -- output --------------------------------------------------------------------------------


def render(result: CaseResult, fmt: str) -> str:
    case, loaded = result.loaded.case, result.loaded
    if result.passed:
        return f"PASS {case.name}"
    lines = [f"FAIL {case.name} ({loaded.file}:{loaded.line})"]
    lines += ["  " + line.replace("\n", "\n  ") for line in result.failures]
    if result.logs:
        lines.append("  runner log:")
        lines += [f"    {line}" for line in result.logs]
    if fmt == "github":
        message = f"{case.name}\n" + "\n".join(result.failures)
        lines.append(
            f"::error file={escape_annotation(loaded.file, True)},line={loaded.line},"
            f"title={escape_annotation('flow test failed', True)}::{escape_annotation(message)}"
        )
    return "\n".join(lines)
