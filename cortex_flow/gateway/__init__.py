"""The gateway: HTTP, WebSocket and long polling into the flows for agents without Redis."""

from cortex_flow.gateway.server import Gateway

__all__ = ["Gateway"]
