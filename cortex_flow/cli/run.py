"""``cortex-flow run``: validate, provision, run and hot-reload until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time

from cortex_flow.flow.loader import load_project
from cortex_flow.ops.dashboard import mount
from cortex_flow.runtime.callpool import THREAD_PREFIX
from cortex_flow.runtime.logs import setup_logging
from cortex_flow.runtime.runner import ForcedStop, Runner, serve

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


def command(args: argparse.Namespace) -> int:
    project = load_project(args.config)
    setup_logging(project.config.log.level, project.config.log.format)
    # call targets import from the folder that holds config.yaml, as `python -m` would there
    if str(project.base_dir) not in sys.path:
        sys.path.insert(0, str(project.base_dir))
    try:
        asyncio.run(serve(Runner(project, announce=_announce, ui=mount)))
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
