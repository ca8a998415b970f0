"""Redis stream entry IDs (``1700000000000-3``): when an entry was added, and their order."""

from __future__ import annotations

__all__ = ["id_key", "id_ms"]


def id_ms(entry_id: str) -> int:
    """The millisecond timestamp of a stream entry ID (``1700000000000-3``)."""
    return int(entry_id.partition("-")[0])


def id_key(entry_id: str) -> tuple[int, int]:
    """A sort key for stream entry IDs: compared as strings, ``9-0`` would follow ``10-0``."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
