"""Harold, the coordinator: an example async handler for its inbox."""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger("agents_example.harold")


async def handle(msg: Mapping[str, str]) -> None:
    """Log the direct message; raising here would make cortex-flow retry it."""
    log.info("harold got %s", dict(msg))
