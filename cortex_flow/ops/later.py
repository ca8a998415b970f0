"""Publishing later or once: ``delay=`` / ``at=`` and ``idempotency_key=``.

A delayed message waits in Redis (:mod:`cortex_flow.wire.delayed`) until the runners'
mover duty adds it to its stream. An idempotency key makes a repeated publish within
its window answer the first entry's ID instead of adding a second: one script that
looks the key up and XADDs in one step (Redis 8.6's ``XADD ... IDMP`` does the same on
the server; this works on every version).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.loader import Project
from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.topology import namespace
from cortex_flow.wire.codec import encode
from cortex_flow.wire.delayed import Delayed, schedule

DEFAULT_WINDOW = 600.0  # an idempotency key without a dedup window is remembered 10m

# KEYS[1] the idempotency key, KEYS[2] the stream; ARGV[1] window ms, then the fields
ONCE = """
local id = redis.call('GET', KEYS[1])
if id then return id end
id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[1], id, 'PX', ARGV[1])
return id
"""


def delay_of(
    delay: float | None, at: datetime | float | None, idempotency_key: str | None = None
) -> float | None:
    """Seconds from now, from ``delay`` (seconds) or ``at`` (a datetime or epoch seconds)."""
    if delay is not None and at is not None:
        raise CortexFlowError("give delay= or at=, not both")
    if idempotency_key is not None and (delay is not None or at is not None):
        raise CortexFlowError(
            "idempotency_key= applies to a message sent now, not to a delayed one; drop one of them"
        )
    if at is not None:
        when = at.timestamp() if isinstance(at, datetime) else float(at)
        return max(0.0, when - time.time())
    if delay is not None and delay < 0:
        raise CortexFlowError(f"delay must be 0 or more seconds, got {delay}")
    return delay


async def publish_later(
    client: Any, project: Project, key: str, spec: StreamSpec, msg: Mapping[str, Any], delay: float
) -> Delayed:
    """Hold ``msg`` for ``key`` until ``delay`` seconds from now."""
    ns = namespace(project.topology)
    return await schedule(client, ns, key, encode(spec.codec, msg), delay)


def window_of(project: Project, stream: str) -> float:
    """How long an idempotency key for ``stream`` is remembered: the longest dedup window
    of the groups reading it, else :data:`DEFAULT_WINDOW`."""
    windows = [
        g.dedup.window
        for g in project.topology.groups.values()
        if g.stream == stream and g.dedup is not None
    ]
    return max(windows, default=DEFAULT_WINDOW)


async def publish_once(
    client: Any, key: str, spec: StreamSpec, msg: Mapping[str, Any], ident: str, window: float
) -> str:
    """XADD ``msg`` unless ``ident`` was published to ``key`` within ``window``; the ID."""
    fields = encode(spec.codec, msg)
    flat = [x for pair in fields.items() for x in pair]
    marker = f"{key}:idem:{ident}"  # the stream's hash tag, so one slot in a cluster
    found = await client.eval(ONCE, 2, marker, key, round(window * 1000), *flat)
    return found.decode() if isinstance(found, bytes) else str(found)


__all__ = ["delay_of", "publish_later", "publish_once", "window_of"]
