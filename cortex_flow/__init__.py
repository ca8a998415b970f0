"""cortex-flow: declarative Redis Streams topologies.

The public names below load on first use, so ``import cortex_flow`` (and
``cortex-flow validate``) never imports redis or aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cortex_flow.errors import RequestCanceled, RequestFailed, RequestTimeout
from cortex_flow.version import __version__

__all__ = [
    "Client",
    "FlowHarness",
    "RequestCanceled",
    "RequestFailed",
    "RequestTimeout",
    "Runner",
    "__version__",
    "load_project",
]

_LAZY = {
    "Client": "cortex_flow.client",
    "FlowHarness": "cortex_flow.testing",
    "Runner": "cortex_flow.runtime.runner",
    "load_project": "cortex_flow.flow.loader",
}

if TYPE_CHECKING:
    from cortex_flow.client import Client
    from cortex_flow.flow.loader import load_project
    from cortex_flow.runtime.runner import Runner
    from cortex_flow.testing import FlowHarness


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cortex_flow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
