"""Which priority level to read next: strict order, or smooth weighted round robin."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cortex_flow.flow.topology import StreamKey


def default_weights(levels: int) -> list[int]:
    """Halve the share per level, highest first: 8, 4, 2, 1 for four levels."""
    return [2 ** (levels - 1 - i) for i in range(levels)]


class Scheduler:
    """Orders a group's keys for the next read.

    strict: always highest priority first. weighted: smooth weighted round robin
    (as nginx does) picks the level to try first, so under a backlog each level
    gets its weight's share and none starves; the rest follow by weight.
    """

    def __init__(
        self, keys: Sequence[StreamKey], mode: str, weights: Mapping[str, int] | None
    ) -> None:
        self.mode = mode
        n = len(keys)
        if weights:
            self.weights = [max(1, weights.get(k.priority or "", 1)) for k in keys]
        else:
            levels = sorted({k.priority for k in keys}, key=[k.priority for k in keys].index)
            per_level = dict(zip(levels, default_weights(len(levels)), strict=True))
            self.weights = [per_level[k.priority] for k in keys]
        self.current = [0] * n
        self.total = sum(self.weights)
        self._strict = list(range(n))
        self._by_weight = sorted(range(n), key=lambda i: -self.weights[i])

    def order(self) -> list[int]:
        if self.mode != "weighted":
            return self._strict
        for i, w in enumerate(self.weights):
            self.current[i] += w
        pick = max(range(len(self.current)), key=self.current.__getitem__)
        self.current[pick] -= self.total
        return [pick, *(i for i in self._by_weight if i != pick)]

    def served(self, index: int) -> None:
        """Hook for accounting; smooth WRR already charged the pick in ``order``."""
