"""The dead-letter entry format: the original fields, byte for byte, plus ``dlq_*`` metadata.

Written by the runner's groups (:mod:`cortex_flow.runtime.commit`) and by a
:class:`cortex_flow.Client` reading its inbox (for an entry its handler gave up on, or
one it cannot decode); read back by ``cortex-flow dlq`` (:mod:`cortex_flow.ops.dlq`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

__all__ = [
    "ERROR_LIMIT",
    "FAILURES_TTL",
    "MAX_ERROR",
    "crash_reason",
    "dead_letter_fields",
    "failures_key",
]

ERROR_LIMIT = 4000  # characters of the error kept in dlq_error
MAX_ERROR = ERROR_LIMIT
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
    fields: Mapping[str, str], key: str, entry_id: str, group: str, deliveries: int, error: str
) -> dict[str, str]:
    """``fields`` plus where the entry came from, who gave up on it, how often and why.

    ``fields`` as read (with surrogateescape): written back through the same client, a
    field that is not UTF-8 keeps its bytes.
    """
    return {
        **fields,
        "dlq_stream": key,
        "dlq_id": entry_id,
        "dlq_group": group,
        "dlq_deliveries": str(deliveries),
        "dlq_error": error[:ERROR_LIMIT],
        "dlq_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
