"""The runner's duty leases on a real server: one holder, takeover, a stale holder fenced."""

from __future__ import annotations

import logging
from typing import Any

from projects import wait_for

from cortex_flow.runtime.duties import Duties
from cortex_flow.wire.duties import FENCE_CHECK, Fence, fenced_call

ACT = FENCE_CHECK + "return redis.call('INCR', KEYS[1])"


def _duties(client: Any, holder: str, lease: float) -> Duties:
    return Duties(client, holder=holder, lease=lease, log=logging.getLogger("test.duties"))


async def test_one_holder_acts_and_another_takes_over_when_it_stops_renewing(
    redis_client: Any, key_prefix: str, caplog: Any
) -> None:
    """Two runners share a duty: only the holder acts. When the holder stalls (it stops
    renewing but believes it still holds), the other takes the duty over after the lease,
    and the stalled holder's next act is refused by the fencing token: it stops."""
    caplog.set_level(logging.INFO, "test.duties")
    lease, counter = f"{key_prefix}{{d}}:lease", f"{key_prefix}{{d}}:acts"
    acts: dict[str, list[int]] = {"a": [], "b": []}

    def act_as(name: str) -> Any:
        async def act(fence: Fence) -> None:
            acts[name].append(int(await fenced_call(redis_client, ACT, fence, [counter], [])))

        return act

    changes: list[tuple[str, bool]] = []
    a, b = _duties(redis_client, "a", 0.6), _duties(redis_client, "b", 0.6)
    for name, duties in (("a", a), ("b", b)):
        duties.add(
            "d",
            lease,
            interval=0.05,
            act=act_as(name),
            on_change=lambda held, n=name: changes.append((n, held)),
        )
    await a.start()
    await b.start()
    try:
        await wait_for(lambda: len(acts["a"]) >= 3, what="a acting")
        assert acts["b"] == [] and changes == [("a", True)]
        first = a.fence("d")
        assert first is not None

        # a stalls: no more renewals, yet it believes it holds the lease for a long time
        assert a._renew is not None
        a._renew.cancel()
        a._duties["d"].held_until = float("inf")
        await wait_for(lambda: b.fence("d") is not None, timeout=5, what="b taking over")
        taken = b.fence("d")
        assert taken is not None and taken.token > first.token
        await wait_for(lambda: a.fence("d") is None, what="a fenced off")
        assert "duty d: stopped (the lease" in caplog.text
        before = len(acts["a"])
        await wait_for(lambda: len(acts["b"]) >= 3, what="b acting")
        assert len(acts["a"]) == before  # a acts no more
        # every act of a came before the first of b: never both at once
        assert max(acts["a"]) < min(acts["b"])
    finally:
        await a.stop()
        await b.stop()
    assert ("b", True) in changes and ("a", False) in changes


async def test_a_graceful_stop_hands_the_duty_over_at_once(
    redis_client: Any, key_prefix: str
) -> None:
    """A stopping runner releases its lease: the other takes it at its next renewal,
    without waiting for the lease to expire."""
    lease = f"{key_prefix}{{d}}:lease"
    a, b = _duties(redis_client, "a", 30.0), _duties(redis_client, "b", 0.3)
    a.add("d", lease)
    b.add("d", lease)
    await a.start()
    await b.start()
    try:
        assert a.fence("d") is not None and b.fence("d") is None
        await a.stop()
        await wait_for(lambda: b.fence("d") is not None, timeout=2, what="b taking over")
    finally:
        await b.stop()
