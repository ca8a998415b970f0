"""Agent up/down events (``heartbeats.on_down``): an example inline handler."""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger("agents_example.events")


def note(msg: Mapping[str, str]) -> None:
    """Log the event; a pager or a chat message would go here."""
    log.warning("event: %s", dict(msg))
