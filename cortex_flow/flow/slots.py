"""Cluster hash slots and stream partitions, without Redis.

A Redis Cluster stores a key in one of 16,384 slots: CRC16 of the key, or of its hash
tag (the text between the first ``{`` and the next ``}``, when not empty). One command
touches one slot only, so a group whose keys share a slot is read with one blocking
XREADGROUP and commits its publishes atomically with the XACK.

A stream with ``partitions: N`` has the key variable ``{{ partition }}``, which renders
as the hash tag ``{p0}`` ... ``{pN-1}``: each partition keeps its priority levels in one
slot, and the partitions spread over the cluster's masters. A producer picks the
partition of a message from the stream's ``partition_key`` (the same value, the same
partition: CRC32 of the rendered text, modulo N, stable across processes and
languages), or round-robin without one.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from cortex_flow.flow.templates import Template, make_context

SLOTS = 16384
PARTITION = "partition"


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def hash_tag(key: str) -> str | None:
    """The key's hash tag (``{...}``, non-empty), or None: then the whole key is hashed."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


def key_slot(key: str) -> int:
    """The cluster slot of ``key`` (CRC16-XMODEM of its hash tag or of the key, mod 16384)."""
    tag = hash_tag(key)
    crc = 0
    for byte in (tag if tag is not None else key).encode():
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc % SLOTS


def same_slot(keys: Iterable[str]) -> bool:
    """Whether every key of ``keys`` lies in one slot."""
    return len({key_slot(k) for k in keys}) <= 1


def partition_tag(index: int) -> str:
    """What ``{{ partition }}`` renders as for partition ``index``: the hash tag ``{pN}``."""
    return f"{{p{index}}}"


def partition_of(value: str, partitions: int) -> int:
    """The partition of a message whose partition key renders as ``value``."""
    return zlib.crc32(value.encode()) % partitions


class PartitionPicker:
    """Picks the partition of each message published to one partitioned stream."""

    def __init__(self, partitions: int, partition_key: str | None) -> None:
        self.partitions = partitions
        self.template = Template(partition_key) if partition_key else None
        # round-robin from a random start, so producers that start together spread out
        self._next = itertools.count(random.randrange(self.partitions))

    def pick(self, msg: Mapping[str, Any]) -> int:
        """The partition for ``msg``; raises the template's error when its key cannot
        render (a missing field: ``UndefinedError``)."""
        if self.template is None:
            return next(self._next) % self.partitions
        value = self.template.render(make_context({"msg": msg}))
        return partition_of(value, self.partitions)

    def tag(self, msg: Mapping[str, Any]) -> str:
        """``{{ partition }}``'s value for ``msg``."""
        return partition_tag(self.pick(msg))
