"""Conversations on the wire: the fields a request carries and what a reply holds.

The format is the contract in docs/spec.md ("Conversations"), so an agent in another
language can ask or answer without the Python client. A request is an ordinary entry of
its stream plus these fields (the message itself stays as its codec puts it):

- ``cf_corr``: the correlation id the requester chose (unique per request)
- ``cf_reply``: the requester's reply stream
- ``cf_deadline``: the deadline, Unix time in milliseconds (also without a reply)
- ``cf_task``: the task-state key, set once a ``to`` route carried the request on

A reply is an entry of the reply stream with ``corr``, ``kind`` (``part``, ``final``,
``failed``, ``expired`` or ``canceled``), ``seq`` (0, 1, ... in the order sent),
``attempt`` (the delivery that produced it: a higher one than before means the
handler was restarted), ``stream`` and ``id`` (the request entry), and ``data`` (JSON
of the part or the result) or ``error``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CORR, REPLY, DEADLINE, TASK = "cf_corr", "cf_reply", "cf_deadline", "cf_task"
# the fields a request carries beside its message; stripped from a raw message
FIELDS = (CORR, REPLY, DEADLINE, TASK)

PART, FINAL, FAILED, EXPIRED, CANCELED = "part", "final", "failed", "expired", "canceled"
ENDS = frozenset({FINAL, FAILED, EXPIRED, CANCELED})

# a reply stream holds about this many entries at most (XADD MAXLEN ~)
REPLY_MAXLEN = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


def reply_key(prefix: str, requester: str) -> str:
    """A requester's reply stream."""
    return f"{prefix}replies:{requester}"


def task_key(prefix: str, stream_key: str, entry_id: str) -> str:
    """The hash holding the state of the task begun by entry ``entry_id`` of ``stream_key``."""
    return f"{prefix}task:{stream_key}:{entry_id}"


def cancel_channel(prefix: str) -> str:
    """The pub/sub channel cancels are announced on (payload: ``stream key`` space ``id``)."""
    return f"{prefix}cancel"


def recent_cancels(prefix: str) -> str:
    """The sorted set of recent cancels (member ``stream key`` space ``id``, score Unix ms)."""
    return f"{prefix}cancels"


def deadline_of(fields: Mapping[str, str]) -> int | None:
    """The entry's deadline in Unix ms, or None (no deadline, or one that cannot be read)."""
    raw = fields.get(DEADLINE)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def reply_fields(
    corr: str,
    kind: str,
    *,
    stream: str,
    entry_id: str,
    attempt: int,
    seq: int = 0,
    data: Any = None,
    error: str | None = None,
) -> dict[str, str]:
    """The fields of one reply entry (raises TypeError/ValueError if ``data`` is not JSON)."""
    fields = {
        "corr": corr,
        "kind": kind,
        "seq": str(seq),
        "attempt": str(attempt),
        "stream": stream,
        "id": entry_id,
    }
    if error is not None:
        fields["error"] = error
    else:
        fields["data"] = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return fields


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply as the requester reads it."""

    corr: str
    kind: str
    seq: int
    attempt: int
    stream: str
    id: str
    data: Any = None
    error: str | None = None

    @property
    def ends(self) -> bool:
        """Whether nothing follows it for this request."""
        return self.kind in ENDS


def parse_reply(fields: Mapping[str, str]) -> Reply | None:
    """The reply an entry holds, None for anything else in the stream."""
    corr, kind = fields.get("corr"), fields.get("kind")
    if corr is None or kind is None:
        return None
    data = fields.get("data")
    try:
        value = json.loads(data) if data is not None else None
    except ValueError:
        value = data
    return Reply(
        corr,
        kind,
        int(fields.get("seq", "0") or 0),
        int(fields.get("attempt", "1") or 1),
        fields.get("stream", ""),
        fields.get("id", ""),
        value,
        fields.get("error"),
    )
