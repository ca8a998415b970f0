"""What a group consumer moves around: an entry read from a stream, and its outcome.

Shared by the pieces of a consumer (:mod:`cortex_flow.runtime.consumer` reads,
:mod:`cortex_flow.runtime.handling` turns an entry into an outcome,
:mod:`cortex_flow.runtime.commit` applies outcomes, :mod:`cortex_flow.runtime.pending` takes entries
back); none of them needs the others' classes.
"""

from __future__ import annotations

from collections.abc import Iterator
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


@dataclass(slots=True)
class Acks:
    """Entries of one key that ran and have nothing to publish: one XACK for them all.

    The inline path's usual outcome, kept without an :class:`Outcome` per entry.
    """

    key: str
    entries: list[Entry]
    retried: int = 0  # of them, delivered before
    ids: set[str] | None = None  # the entries' IDs, made when first asked for
    loose: bool = False  # held as a (key, id) each rather than as a whole

    def holds(self, entry_id: str) -> bool:
        if self.ids is None:
            self.ids = {e.id for e in self.entries}
        return entry_id in self.ids


class Held(set[tuple[str, str]]):
    """The (key, id) of the entries a consumer holds: running, waiting, to be committed.

    A set of (key, id), plus whole :class:`Acks` held and released at once: the inline
    path holds its acknowledgements without a (key, id) per entry. Membership, length
    and iteration count both; ``add``, ``update``, ``discard`` and the like change only
    the set.
    """

    def __init__(self) -> None:
        super().__init__()
        self._acks: dict[int, Acks] = {}
        self._in_acks = 0  # entries in them

    def hold(self, ack: Acks) -> None:
        self._acks[id(ack)] = ack
        self._in_acks += len(ack.entries)

    def release(self, ack: Acks) -> None:
        if self._acks.pop(id(ack), None) is not None:
            self._in_acks -= len(ack.entries)

    def __contains__(self, item: object) -> bool:
        if set.__contains__(self, item):
            return True
        if not self._acks or not isinstance(item, tuple):
            return False
        key, entry_id = item
        return any(a.key == key and a.holds(entry_id) for a in self._acks.values())

    def __len__(self) -> int:
        return set.__len__(self) + self._in_acks

    def __iter__(self) -> Iterator[tuple[str, str]]:
        yield from set.__iter__(self)
        for ack in list(self._acks.values()):
            for entry in ack.entries:
                yield ack.key, entry.id


def plain_acks(outcomes: list[Outcome]) -> list[Acks]:
    """``outcomes`` (plain acknowledgements) as one :class:`Acks` per run of one key."""
    acks: list[Acks] = []
    ack: Acks | None = None
    for outcome in outcomes:
        entry = outcome.entry
        if ack is None or ack.key != entry.key.key:
            ack = Acks(entry.key.key, [], loose=True)
            acks.append(ack)
        ack.entries.append(entry)
        if entry.deliveries > 1:
            ack.retried += 1
    return acks


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
