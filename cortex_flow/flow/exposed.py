"""The running topology as JSON: what a runner's ``GET /topology`` serves and ``plan`` reads.

A runner serves the flows and settings it runs now; ``cortex-flow plan`` reads that back
into a :class:`Topology` and a :class:`Config` and hands both, with the files on disk, to
the same pure :func:`cortex_flow.flow.plan.diff` a reload uses. So the plan shows exactly
what a reload would add, remove, restart or swap.

Secrets never leave the runner: a value under ``http.headers``, a key named like a
credential, and the password in a URL are replaced by a short digest of the value
(``hidden-1a2b3c4d5e6f``). ``plan`` redacts its side the same way before comparing, so a
changed secret still shows as "changed (value hidden)", but its value is never sent.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import ValidationError

from cortex_flow.errors import CortexFlowError
from cortex_flow.flow.config import Config
from cortex_flow.flow.declared import Topology
from cortex_flow.flow.models import AgentSpec, FlowFile
from cortex_flow.flow.plan import is_secret
from cortex_flow.flow.urls import describe_url

__all__ = ["FORMAT", "read_doc", "redact", "topology_doc"]

FORMAT = 1  # bumped when the document changes incompatibly


def _digest(value: str) -> str:
    return "hidden-" + hashlib.sha256(value.encode()).hexdigest()[:12]


def redact(value: Any, path: str = "") -> Any:
    """``value`` (plain JSON data) with every secret replaced by a digest of it."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            secret = is_secret(sub) and isinstance(item, str)
            out[key] = _digest(item) if secret else redact(item, sub)
        return out
    if isinstance(value, list):
        return [redact(item, path) for item in value]
    if isinstance(value, str) and "://" in value:
        shown = describe_url(value)
        return shown.replace("***", _digest(value)) if shown != value else value
    return value


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True) if model is not None else None


def topology_doc(topology: Topology, config: Config, runner: str) -> dict[str, Any]:
    """What ``GET /topology`` answers: the runner's name, its flows and settings, redacted."""
    flows = {
        "version": 1,
        "streams": {name: _dump(spec) for name, spec in topology.streams.items()},
        "agents": {name: _dump(spec) for name, spec in topology.agents.items()},
        "groups": {name: _dump(spec) for name, spec in topology.groups.items()},
    }
    if topology.heartbeats is not None:
        flows["heartbeats"] = _dump(topology.heartbeats)
    return {
        "format": FORMAT,
        "runner": runner,
        "flows": redact(flows),
        "config": redact(_dump(config)),
    }


def read_doc(doc: Any) -> tuple[str, Topology, Config]:
    """The runner name, topology and settings of a :func:`topology_doc` document.

    Raises :class:`CortexFlowError` for a document this version cannot read.
    """
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CortexFlowError(
            f"the runner answered /topology in a format this cortex-flow cannot read "
            f"(format {got}, expected {FORMAT}); use the same version for both"
        )
    try:
        flow = FlowFile.model_validate(doc["flows"])
        config = Config.model_validate(doc["config"])
    except (KeyError, ValidationError) as exc:
        raise CortexFlowError(f"the runner's /topology answer is not valid: {exc}") from exc
    topology = Topology(
        streams=dict(flow.streams),
        agents={name: spec or AgentSpec() for name, spec in flow.agents.items()},
        groups=dict(flow.groups),
        heartbeats=flow.heartbeats,
    )
    return str(doc.get("runner", "")), topology, config
