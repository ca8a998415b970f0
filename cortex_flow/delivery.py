"""What a group consumer moves around: an entry read from a stream, and its outcome.

Shared by the pieces of a consumer (:mod:`cortex_flow.consumer` reads,
:mod:`cortex_flow.handling` turns an entry into an outcome,
:mod:`cortex_flow.commit` applies outcomes, :mod:`cortex_flow.pending` takes entries
back); none of them needs the others' classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cortex_flow.routes import Publish
from cortex_flow.topology import StreamKey

# errors after which the consumer reconnects and re-reads its pending entries
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)

# Outcome.kind: acknowledge (with the publishes), leave pending for a retry, dead-letter.
# Plain ints rather than an Enum: the hot path compares one per message.
ACK, RETRY, DEAD = 0, 1, 2


@dataclass(slots=True)
class Entry:
    """One stream entry as delivered to this consumer; ``deliveries`` counts this one."""

    key: StreamKey
    id: str
    fields: dict[str, str]
    deliveries: int


@dataclass(slots=True)
class Outcome:
    """What became of an entry: ACK with its publishes, RETRY or DEAD with the error."""

    entry: Entry
    kind: int
    publishes: list[Publish]
    error: str = ""


def pairs(flat: list[Any]) -> dict[str, str]:
    """Entry fields given as a flat ``[name, value, ...]`` list, as a dict."""
    it = iter(flat)
    return dict(zip(it, it, strict=True))
