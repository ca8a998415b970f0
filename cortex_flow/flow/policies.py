"""Checks of delivery policies: a group's or an agent inbox's retry, and ``agents.X.inbox``."""

from __future__ import annotations

from cortex_flow.errors import Problem
from cortex_flow.flow.declared import Origin, Topology
from cortex_flow.flow.durations import format_duration as dur
from cortex_flow.flow.models import AgentInbox, RetryPolicy
from cortex_flow.flow.references import Sub, single_key, stream_ref
from cortex_flow.flow.topology import key_variables

__all__ = ["check_inbox", "check_retry"]


def check_retry(
    origin: Origin, retry: RetryPolicy, problems: list[Problem], sub: Sub = ("retry",)
) -> None:
    initial, longest = retry.backoff.initial, retry.backoff.max
    if initial > longest:
        problems.append(
            origin.problem(
                (*sub, "backoff", "initial"),
                f"initial backoff ({dur(initial)}) is longer than max ({dur(longest)}); "
                "lower initial or raise max",
            )
        )
    if retry.claim_idle < initial:
        problems.append(
            origin.problem(
                (*sub, "claim_idle"),
                f"claim_idle ({dur(retry.claim_idle)}) is shorter than the first backoff "
                f"({dur(initial)}), so other consumers would claim failed messages before "
                "their retry is due; raise claim_idle or lower backoff.initial",
            )
        )


def check_inbox(topo: Topology, agent: str, inbox: AgentInbox, problems: list[Problem]) -> None:
    """``agents.X.inbox``: a stream keyed by agent, a dead_letter, one reader per inbox."""
    origin = topo.origin("agents", agent)
    spec = stream_ref(topo, origin, ("inbox", "stream"), inbox.stream, "inbox stream", problems)
    if spec is not None and key_variables(spec) != {"agent"}:
        problems.append(
            origin.problem(
                ("inbox", "stream"),
                f'inbox stream "{inbox.stream}" must have one key per agent and no other '
                f'variable, but its key is "{spec.key}"; use a stream keyed '
                '"...{{ agent }}" such as inbox',
            )
        )
    if inbox.dead_letter is not None:
        what = "dead_letter"
        single_key(topo, origin, ("inbox", "dead_letter"), inbox.dead_letter, what, problems)
    check_retry(origin, inbox.retry, problems, ("inbox", "retry"))
    name = inbox.group or agent
    if name in topo.groups:
        problems.append(
            origin.problem(
                ("inbox",),
                f'the group the agent\'s client reads is named "{name}", like the group at '
                f"{topo.origin('groups', name)}; name it with inbox.group, or rename that group",
            )
        )
    for other, group in topo.groups.items():
        if group.stream == inbox.stream and group.vars.get("agent", agent) == agent:
            problems.append(
                origin.problem(
                    ("inbox",),
                    f"group {other} ({topo.origin('groups', other)}) already reads this "
                    f"agent's {inbox.stream}, so each message would be handled twice; remove "
                    "inbox: to let the group handle them, or the group to read them here",
                )
            )
