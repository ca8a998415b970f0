"""What a group consumer moves around: an entry read from a stream, and its outcome.

Shared by the pieces of a consumer (:mod:`cortex_flow.runtime.consumer` reads,
:mod:`cortex_flow.runtime.handling` turns an entry into an outcome,
:mod:`cortex_flow.runtime.commit` applies outcomes, :mod:`cortex_flow.runtime.pending` takes entries
back); none of them needs the others' classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cortex_flow.flow.models import BackoffPolicy
from cortex_flow.flow.topology import StreamKey
from cortex_flow.runtime.routes import Publish

# errors after which the consumer reconnects and re-reads its pending entries
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)

# Outcome.kind: acknowledge (with the publishes), leave pending for a retry, dead-letter.
# Plain ints rather than an Enum: the hot path compares one per message.
ACK, RETRY, DEAD = 0, 1, 2

# What a server (or a fake) says when it cannot run a script at all, as opposed to a
# passing refusal (OOM, BUSY, MISCONF, NOGROUP) that the consumer loop backs off from.
_NO_SCRIPTING = ("unknown command", "error running script", "not supported", "noscript")


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
    attempt_failed: bool = False  # a route raised: counted in failed_total, last try too


def pairs(flat: list[Any]) -> dict[str, str]:
    """Entry fields given as a flat ``[name, value, ...]`` list, as a dict."""
    it = iter(flat)
    return dict(zip(it, it, strict=True))


def backoff_ms(policy: BackoffPolicy, deliveries: int) -> int:
    """How long an entry delivered ``deliveries`` times waits before the next try."""
    delay = policy.initial * policy.multiplier ** max(deliveries - 1, 0)
    return int(min(delay, policy.max) * 1000)


def scripting_unavailable(exc: ResponseError) -> bool:
    """Whether ``exc``, raised running a script, means scripts cannot run here at all.

    An unknown EVALSHA or SCRIPT command, scripts refused by ACL, a server (or fake) that
    cannot run this one, or NOSCRIPT again after loading it: falling back to plain commands
    is right. Anything else (OOM, BUSY, MISCONF, NOGROUP, ...) passes: it is raised.
    """
    if isinstance(exc, NoScriptError):
        return True
    text = str(exc).lower()
    if isinstance(exc, NoPermissionError):
        return "eval" in text or "script" in text
    return any(marker in text for marker in _NO_SCRIPTING)
