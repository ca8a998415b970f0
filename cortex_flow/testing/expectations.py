"""A flow test case's expectations compared with what Redis and the harness recorded.

Each failure is one readable text: what was expected, what was found instead (a diff of
the closest entry's fields, or where the messages went), for ``cortex-flow test`` to print.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from cortex_flow.flow.testfile import ExpectCall, ExpectDeadLetter, LoadedCase
from cortex_flow.flow.topology import Resolved
from cortex_flow.testing.harness import FlowHarness
from cortex_flow.testing.stubs import Called
from cortex_flow.wire.codec import DecodeError, decode, encode

__all__ = ["CaseCheck"]


def _subset(expected: Any, actual: Any) -> bool:
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        return all(k in actual and _subset(v, actual[k]) for k, v in expected.items())
    return bool(expected == actual)


def _as_stored(codec: str, msg: Mapping[str, Any]) -> dict[str, Any]:
    """``msg`` the way a stream of ``codec`` gives it back: strings for raw."""
    return encode("raw", msg) if codec == "raw" else dict(msg)


def _lines(msg: Mapping[str, Any], keys: Sequence[str] | None = None) -> list[str]:
    shown = keys if keys is not None else sorted(msg)
    return [f"{k}: {json.dumps(msg[k], sort_keys=True)}" for k in shown if k in msg]


def _diff(expected: Mapping[str, Any], actual: Mapping[str, Any], label: str) -> list[str]:
    keys = sorted(expected)
    lines = ["--- expected", f"+++ {label}"]
    diff = difflib.unified_diff(_lines(expected), _lines(actual, keys), n=len(keys), lineterm="")
    lines += [d for d in diff if not d.startswith(("---", "+++", "@@"))]
    return lines


def _decoded(codec: str, fields: dict[str, str]) -> Any:
    try:
        return decode(codec, fields)
    except DecodeError:
        return fields


class CaseCheck:
    """Compares what a case expected with what Redis and the harness recorded."""

    def __init__(self, h: FlowHarness, loaded: LoadedCase) -> None:
        self.h = h
        self.loaded = loaded
        self.case = loaded.case
        self.resolved: Resolved = h.resolved
        self.failures: list[str] = []

    async def run(self, settled: bool) -> list[str]:
        await self.entries()
        self.calls()
        await self.dead_letters()
        await self.pending(settled)
        return self.failures

    async def entries(self) -> None:
        used: set[tuple[str, str]] = set()
        for n, ((key, spec), expect) in enumerate(
            zip(self.loaded.expects, self.case.expect, strict=True)
        ):
            stored = [(i, _decoded(spec.codec, f)) for i, f in await self.h.client.xrange(key)]
            want = _as_stored(spec.codec, expect.msg or {})
            free = [(i, m) for i, m in stored if (key, i) not in used]
            match = next((i for i, m in free if _subset(want, m)), None)
            if match is not None:
                used.add((key, match))
                continue
            where = f"expect[{n}]: "
            if not stored:
                self.failures.append(f"{where}{key} is empty{await self._elsewhere(key)}")
                continue
            if not free:
                self.failures.append(
                    f"{where}{key} has {len(stored)} entries, all matched by earlier expects"
                )
                continue
            best_id, best = max(
                free, key=lambda e: sum(k in e[1] and _subset(v, e[1][k]) for k, v in want.items())
            )
            self.failures.append(
                f"{where}no entry of {key} has these fields"
                + "".join(
                    "\n  " + line
                    for line in _diff(
                        want,
                        best,
                        f"actual {best_id}"
                        + (f" (closest of {len(free)} entries)" if len(free) > 1 else ""),
                    )
                )
            )

    async def _elsewhere(self, key: str) -> str:
        sent = {k for k, _ in self.loaded.sends}
        skip = sent | {key, self.resolved.heartbeat_key or ""}
        found = []
        for other in sorted(self.resolved.keys()):
            if other not in skip:
                length = int(await self.h.client.xlen(other))
                if length:
                    found.append(f"{other} ({length})")
        return f"; entries went to: {', '.join(found)}" if found else ""

    def calls(self) -> None:
        used: set[int] = set()
        for n, expect in enumerate(self.case.calls):
            candidates = [
                (i, c)
                for i, c in enumerate(self.h.calls)
                if _call_fits(expect, c) and i not in used
            ]
            want = expect.msg or {}
            match = next((i for i, c in candidates if _subset(want, c.msg)), None)
            if match is not None:
                used.add(match)
                continue
            what = f"call {expect.call}" if expect.call else f'http route "{expect.http}"'
            if not candidates:
                self.failures.append(f"calls[{n}]: {what} got no message")
            else:
                got = "; ".join(json.dumps(c.msg, sort_keys=True) for _, c in candidates[:5])
                self.failures.append(
                    f"calls[{n}]: {what} got no message with "
                    f"{json.dumps(want, sort_keys=True)}; it got: {got}"
                )

    async def dead_letters(self) -> None:
        by_key = self.resolved.keys()
        streams = self.resolved.streams
        actual = []
        for entry_id, fields in await self.h.dead_letters():
            source = by_key.get(fields.get("dlq_stream", ""))
            codec = streams[source.stream].spec.codec if source else "raw"
            original = {k: v for k, v in fields.items() if not k.startswith("dlq_")}
            actual.append((entry_id, fields, codec, _decoded(codec, original)))
        unmatched = list(actual)
        missing: list[ExpectDeadLetter] = []
        for expect in self.case.dead_letters:
            hit = next((a for a in unmatched if _dead_letter_fits(expect, *a[1:])), None)
            if hit is None:
                missing.append(expect)
            else:
                unmatched.remove(hit)
        if not missing and not unmatched:
            return
        lines = [f"dead_letters: expected {len(self.case.dead_letters)}, got {len(actual)}"]
        for expect in missing:
            parts = [f'error contains "{expect.error}"'] if expect.error else []
            parts += [f"group {expect.group}"] if expect.group else []
            parts += [f"msg {json.dumps(expect.msg, sort_keys=True)}"] if expect.msg else []
            lines.append("  - missing: " + (", ".join(parts) or "any dead letter"))
        for entry_id, fields, _, msg in unmatched:
            lines.append(
                f"  + {entry_id} from {fields.get('dlq_stream')} (group {fields.get('dlq_group')},"
                f" {fields.get('dlq_deliveries')} deliveries): {fields.get('dlq_error')}"
                f"\n      msg {json.dumps(msg, sort_keys=True)}"
            )
        self.failures.append("\n".join(lines))

    async def pending(self, settled: bool) -> None:
        backlog = await self.h.backlog()
        total = sum(p for p, _ in backlog.values())
        detail = ", ".join(
            f"group {g} on {k}: {p}{' + unread' if u else ''}"
            for (g, k), (p, u) in sorted(backlog.items())
            if p or u
        )
        if not settled:
            self.failures.append(
                f"routing did not settle within {self.case.timeout:g}s: messages are still "
                f"unread or being retried ({detail}); raise timeout: if that is expected"
            )
        elif total != self.case.pending:
            self.failures.append(
                f"pending: expected {self.case.pending}, got {total}"
                + (f" ({detail})" if detail else "")
            )


def _call_fits(expect: ExpectCall, called: Called) -> bool:
    if expect.call is not None:
        return called.kind == "call" and called.target == expect.call
    return called.kind == "http" and expect.http is not None and expect.http in called.target


def _dead_letter_fits(
    expect: ExpectDeadLetter, fields: dict[str, str], codec: str, msg: Any
) -> bool:
    if expect.error is not None and expect.error not in fields.get("dlq_error", ""):
        return False
    if expect.group is not None and expect.group != fields.get("dlq_group"):
        return False
    return expect.msg is None or _subset(_as_stored(codec, expect.msg), msg)
