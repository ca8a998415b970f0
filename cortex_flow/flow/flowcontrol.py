"""Flow control of a group: ``rate_limit``, ``max_in_flight`` and ``dedup``, checked.

The models are in :mod:`cortex_flow.flow.models`; the rules that need more than one
field (a key template's names, a dedup window against the retry span) live here, as do
the names a flow-control key may use and the span itself, which the runtime shares.
"""

from __future__ import annotations

from collections.abc import Iterable

from cortex_flow.errors import Problem
from cortex_flow.flow.declared import Origin
from cortex_flow.flow.durations import format_duration as dur
from cortex_flow.flow.modelerrors import did_you_mean
from cortex_flow.flow.models import GroupSpec, RetryPolicy
from cortex_flow.flow.templates import builtin_names, compile_template

# what a rate or dedup key may use: the message and where it came from, before any route
KEY_NAMES = frozenset({"msg", "id", "stream", "group", "priority", "agent"})


def retry_span(retry: RetryPolicy) -> float:
    """Seconds from a message's first delivery to its last: the backoffs between them."""
    backoff, total = retry.backoff, 0.0
    for deliveries in range(1, retry.max_deliveries):
        total += min(backoff.initial * backoff.multiplier ** (deliveries - 1), backoff.max)
    return total


def flow_limits(group: GroupSpec) -> str:
    """The group's flow control in a few words (``graph``): ``rate 60/m burst 10 per
    {{ msg.tenant }}, max 5 in flight, dedup {{ msg.id }} for 10m``; empty if none."""
    parts = []
    if group.rate_limit is not None:
        rate = group.rate_limit
        text = f"rate {rate.rate}" + (f" burst {rate.burst}" if rate.burst else "")
        parts.append(text + (f" per {rate.key}" if rate.key else ""))
    if group.max_in_flight is not None:
        parts.append(f"max {group.max_in_flight} in flight")
    if group.dedup is not None:
        parts.append(f"dedup {group.dedup.key} for {dur(group.dedup.window)}")
    return ", ".join(parts)


def check_flow_control(
    origin: Origin,
    group: GroupSpec,
    names: Iterable[str],
    problems: list[Problem],
    *,
    partitioned: bool = False,
) -> None:
    """Key templates use known names; a dedup window outlasts the retries of the first copy;
    no flow control on a partitioned stream (not supported there yet)."""
    allowed = sorted(KEY_NAMES | set(names))
    if partitioned:
        for field in ("rate_limit", "max_in_flight", "dedup"):
            if getattr(group, field) is not None:
                problems.append(
                    origin.problem(
                        (field,),
                        f"{field} does not apply to a group on a partitioned stream yet; "
                        "remove it, or read a stream without partitions",
                        at_key=True,
                    )
                )
    if group.rate_limit is not None and group.rate_limit.key is not None:
        _key(origin, ("rate_limit", "key"), group.rate_limit.key, allowed, problems)
    if group.dedup is not None:
        _key(origin, ("dedup", "key"), group.dedup.key, allowed, problems)
        span = retry_span(group.retry) + group.retry.claim_idle
        if group.dedup.window < span:
            problems.append(
                origin.problem(
                    ("dedup", "window"),
                    f"window ({dur(group.dedup.window)}) is shorter than the retry span "
                    f"({dur(span)}: the backoffs of {group.retry.max_deliveries} deliveries "
                    "plus claim_idle), so a copy arriving while the first is retried would "
                    f"run again; raise window to at least {dur(span)}",
                )
            )


def unbound_in_flight(origin: Origin, group: GroupSpec, runners: int) -> Problem | None:
    """``max_in_flight`` above the sum of the concurrency of ``runners`` consumers: it limits
    nothing (a warning: more runners may come). Needs the number of runners serving the
    group, so ``status`` says it, not ``validate``."""
    limit = group.max_in_flight
    if limit is None or runners < 1 or limit <= group.concurrency * runners:
        return None
    total = group.concurrency * runners
    return origin.problem(
        ("max_in_flight",),
        f"max_in_flight ({limit}) is above the sum of concurrency of the {runners} runner(s) "
        f"serving the group ({runners} x {group.concurrency} = {total}), so it limits "
        f"nothing; lower it to {total} or less, or raise concurrency",
    )


def _key(
    origin: Origin, sub: tuple[str, ...], source: str, allowed: list[str], problems: list[Problem]
) -> None:
    try:
        template = compile_template(source)
    except Exception as exc:  # a syntax error or a template over the limits
        problems.append(origin.problem(sub, f'template "{source}" {exc}'))
        return
    if template.is_literal:
        problems.append(
            origin.problem(
                sub,
                f'key "{source}" is the same for every message; use a template such as '
                '"{{ msg.id }}"',
            )
        )
    for name in sorted(template.variables - set(allowed) - builtin_names()):
        hint = did_you_mean(name, allowed) or f"; the names available are {', '.join(allowed)}"
        problems.append(origin.problem(sub, f'template uses unknown name "{name}"{hint}'))


__all__ = [
    "KEY_NAMES",
    "check_flow_control",
    "flow_limits",
    "retry_span",
    "unbound_in_flight",
]
