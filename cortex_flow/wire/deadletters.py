"""What a dead letter holds: the original fields, byte for byte, plus ``dlq_*`` metadata.

Written by the runner (:mod:`cortex_flow.runtime.commit`) and by the agents' client for
an inbox entry it cannot decode; read by :mod:`cortex_flow.ops.dlq`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

MAX_ERROR = 4000  # characters of ``dlq_error`` kept
# How long a failure count outlives its last failure (a safety net: each entry's count
# is deleted once the entry is acknowledged or dead-lettered).
FAILURES_TTL = 7 * 24 * 3600


def failures_key(source: str) -> str:
    """The hash counting failed deliveries of ``source``'s entries (``group:id``: count).

    Kept so that an entry dead-lettered after crashes can say how many of its
    deliveries ended with its runner dead rather than with a failure.
    """
    return f"{source}~cortex-flow-failures"


def crash_reason(deliveries: int, failures: int) -> str:
    """Why an entry delivered ``deliveries`` times, ``failures`` of them failed and the
    others ended without an outcome, is dead-lettered without running again."""
    died = max(0, deliveries - failures)
    text = (
        f"delivered {deliveries} time{'' if deliveries == 1 else 's'}; {died} "
        f"runner{' ' if died == 1 else 's '}died holding it"
    )
    if failures:
        text += f", {failures} deliver{'y' if failures == 1 else 'ies'} failed"
    return text


def dead_letter_fields(
    fields: Mapping[str, str], source: str, entry_id: str, group: str, deliveries: int, error: str
) -> dict[str, str]:
    """The fields of a dead letter for entry ``entry_id`` of ``source``.

    ``fields`` as read (with surrogateescape): written back through the same client,
    a field that is not UTF-8 keeps its bytes.
    """
    dead = dict(fields)
    dead.update(
        dlq_stream=source,
        dlq_id=entry_id,
        dlq_group=group,
        dlq_deliveries=str(deliveries),
        dlq_error=error[:MAX_ERROR],
        dlq_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
    )
    return dead
