"""``validate`` on a Redis Cluster: the keys one group reads must share a slot.

A group whose keys (its priority levels, its agents' inboxes) lie in several slots
cannot wait on them in one blocking read, so its runner polls them (up to a second of
latency, a command per key per poll), and its publishes lose their atomicity with the
XACK. One hash tag fixes it; a partitioned stream is checked partition by partition.
"""

from __future__ import annotations

from cortex_flow.errors import Problem
from cortex_flow.flow.declared import Topology
from cortex_flow.flow.slots import key_slot
from cortex_flow.flow.topology import expand, partitions_of
from cortex_flow.flow.urls import targets_cluster


def tagged_spelling(key: str, stream: str) -> str:
    """The key with its fixed head as a hash tag: ``cortex:tasks:{{ priority }}`` ->
    ``{cortex:tasks}:{{ priority }}``."""
    head, sep, rest = key.partition("{{")
    tag = head.rstrip(":") or stream
    tail = (sep + rest) if sep else ""
    return f"{{{tag}}}:{tail}" if tail else f"{{{tag}}}"


def cluster_slot_problems(topo: Topology, url: str) -> list[Problem]:
    """For a cluster ``url``: each group whose keys (per partition) span slots."""
    if not targets_cluster(url):
        return []
    problems = []
    agents = sorted(topo.agents)
    for name, group in topo.groups.items():
        spec = topo.streams.get(group.stream)
        if spec is None:
            continue
        keys, dynamic = expand(spec, group.stream, agents, group.vars)
        if dynamic:
            continue
        for part in partitions_of(keys):
            slots = {key_slot(k.key) for k in part}
            if len(slots) <= 1:
                continue
            listed = ", ".join(k.key for k in part[:4]) + (", ..." if len(part) > 4 else "")
            fix = tagged_spelling(spec.key, group.stream)
            problems.append(
                topo.origin("groups", name).problem(
                    ("stream",),
                    f'on a Redis Cluster the keys of stream "{group.stream}" this group reads '
                    f"lie in {len(slots)} slots ({listed}): it cannot wait on them in one "
                    "read and polls them instead, and its publishes are not atomic with "
                    f'the XACK; give the key one hash tag, key: "{fix}", or spread a busy '
                    "stream over the masters with partitions: N and {{ partition }} in its key",
                )
            )
            break
    return problems
