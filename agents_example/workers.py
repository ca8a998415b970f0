"""Worker: an example sync handler for batch jobs (runs in a thread)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger("agents_example.workers")


def run_batch(msg: Mapping[str, str]) -> None:
    """Pretend to run a batch job; a missing ``job`` field is a failure, retried then DLQ'd."""
    if "job" not in msg:
        raise ValueError("batch message has no job field")
    log.info("worker ran job %s", msg["job"])
