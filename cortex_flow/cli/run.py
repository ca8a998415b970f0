"""``cortex-flow run``: validate, provision, run and hot-reload until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time

from cortex_flow.flow.loader import Project, load_project
from cortex_flow.gateway import Gateway
from cortex_flow.ops.dashboard import mount
from cortex_flow.runtime.callpool import THREAD_PREFIX
from cortex_flow.runtime.logs import setup_logging
from cortex_flow.runtime.runner import ForcedStop, Runner, serve
from cortex_flow.wire.access import connect_project

log = logging.getLogger("cortex_flow.runner")


def _announce(line: str) -> None:
    # stdout, not the log: it is what a person copies into another terminal
    print(line, flush=True)


def _calls_still_running(wait: float = 0.5) -> bool:
    """True if a sync ``call`` thread outlived the drain (idle workers exit at once)."""
    deadline = time.monotonic() + wait
    for thread in threading.enumerate():
        if thread.name.startswith(THREAD_PREFIX):
            thread.join(max(0.0, deadline - time.monotonic()))
    return any(t.name.startswith(THREAD_PREFIX) and t.is_alive() for t in threading.enumerate())


async def _run(project: Project) -> None:
    """The runner, and the gateway beside it when ``gateway.listen`` is set (it reads the
    runner's project, so a reload changes its tokens and streams)."""
    runner = Runner(project, announce=_announce, ui=mount)
    if project.config.gateway.listen is None:
        await serve(runner)
        return
    gateway = Gateway(
        lambda: runner.project,
        # on first use, after the runner started (an embedded server is running by then)
        lambda: connect_project(runner.project, wait=10.0, log=log),
        log=logging.getLogger("cortex_flow.gateway"),
    )
    await gateway.start()
    try:
        await serve(runner)
    finally:
        await gateway.stop()


def command(args: argparse.Namespace) -> int:
    project = load_project(args.config)
    setup_logging(project.config.log.level, project.config.log.format)
    # call targets import from the folder that holds config.yaml, as `python -m` would there
    if str(project.base_dir) not in sys.path:
        sys.path.insert(0, str(project.base_dir))
    try:
        asyncio.run(_run(project))
        code = 0
    except KeyboardInterrupt:
        code = 130
    except ForcedStop:
        code = 1
    if _calls_still_running():
        # Python would wait for the thread at exit, for as long as the call takes. Its
        # message is still pending, so the next consumer gets it: leave now.
        log.warning("a sync call is still running after the drain; exiting without it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
