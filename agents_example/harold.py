"""Harold, the coordinator: an example async handler for its inbox."""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger("agents_example.harold")


async def handle(msg: Mapping[str, str]) -> None:
    """Take a direct message; one without ``text`` is malformed: raising makes cortex-flow
    retry it, then (after the group's max_deliveries) dead-letter it with this reason."""
    if not msg.get("text"):
        raise ValueError("message to harold has no text field")
    log.info("harold got %s", dict(msg))
