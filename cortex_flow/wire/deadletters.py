"""What a dead letter holds: the original fields, byte for byte, plus ``dlq_*`` metadata.

Written by the runner (:mod:`cortex_flow.runtime.commit`) and by the agents' client for
an inbox entry it cannot decode; read by :mod:`cortex_flow.ops.dlq`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

MAX_ERROR = 4000  # characters of ``dlq_error`` kept


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
