"""Testing flows: :class:`FlowHarness` for pytest suites and the ``cortex-flow test`` runner.

See :mod:`cortex_flow.testing.harness` for the harness's options.
"""

from cortex_flow.testing.harness import Called, FlowHarness, HandlerFailed, private_redis

__all__ = ["Called", "FlowHarness", "HandlerFailed", "private_redis"]
