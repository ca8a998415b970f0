"""Checks that a name in a flow refers to a declared stream (and, where needed, one key)."""

from __future__ import annotations

from collections.abc import Sequence

from cortex_flow.errors import Problem
from cortex_flow.flow.declared import Origin, Topology
from cortex_flow.flow.modelerrors import did_you_mean
from cortex_flow.flow.models import StreamSpec
from cortex_flow.flow.topology import key_variables

__all__ = ["Sub", "single_key", "stream_ref"]

Sub = Sequence[str | int]


def stream_ref(
    topo: Topology, origin: Origin, sub: Sub, name: str, what: str, problems: list[Problem]
) -> StreamSpec | None:
    spec = topo.streams.get(name)
    if spec is None and name not in topo.unsure_streams:
        known = sorted(topo.streams)
        hint = did_you_mean(name, known) or (
            f"; the declared streams are {', '.join(known)}"
            if known
            else "; no streams are declared: declare it under streams:"
        )
        problems.append(origin.problem(sub, f'{what} "{name}" is not a declared stream{hint}'))
    return spec


def single_key(
    topo: Topology, origin: Origin, sub: Sub, name: str, what: str, problems: list[Problem]
) -> None:
    spec = stream_ref(topo, origin, sub, name, what, problems)
    if spec is not None and key_variables(spec):
        variables = ", ".join(sorted(key_variables(spec)))
        problems.append(
            origin.problem(
                sub,
                f'{what} "{name}" must be one stream, but its key "{spec.key}" has variables '
                f"({variables}); use a stream whose key is fixed text",
            )
        )
