"""The dead-letter entry format: the original fields plus ``dlq_*`` metadata.

Written by the runner's groups (:mod:`cortex_flow.runtime.commit`) and by a
:class:`cortex_flow.Client` reading its inbox; read back by ``cortex-flow dlq``
(:mod:`cortex_flow.ops.dlq`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

__all__ = ["ERROR_LIMIT", "dead_letter_fields"]

ERROR_LIMIT = 4000  # characters of the error kept in dlq_error


def dead_letter_fields(
    fields: Mapping[str, str], *, key: str, entry_id: str, group: str, deliveries: int, error: str
) -> dict[str, str]:
    """``fields`` plus where the entry came from, who gave up on it, how often and why."""
    return {
        **fields,
        "dlq_stream": key,
        "dlq_id": entry_id,
        "dlq_group": group,
        "dlq_deliveries": str(deliveries),
        "dlq_error": error[:ERROR_LIMIT],
        "dlq_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
