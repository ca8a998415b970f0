"""``cortex-flow gateway``: serve the gateway on its own (no runner) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from cortex_flow.errors import UsageError
from cortex_flow.flow.loader import Project, load_project
from cortex_flow.gateway import Gateway
from cortex_flow.runtime.logs import setup_logging
from cortex_flow.wire.access import connect_project

log = logging.getLogger("cortex_flow.gateway")


def command(args: argparse.Namespace) -> int:
    project = load_project(args.config)
    setup_logging(project.config.log.level, project.config.log.format)
    if project.config.gateway.listen is None:
        raise UsageError(
            "gateway.listen is off in the config; set it, e.g. gateway: {listen: 127.0.0.1:8480}"
        )
    try:
        asyncio.run(serve(project))
    except KeyboardInterrupt:
        return 130
    return 0


def gateway_for(project: Project) -> Gateway:
    """The gateway of ``project``, connecting to its Redis on first use."""
    return Gateway(lambda: project, lambda: connect_project(project, wait=3.0, log=log), log=log)


async def serve(project: Project) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with gateway_for(project) as gateway:
            print(f"gateway listening on port {gateway.bound_port}", flush=True)
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
