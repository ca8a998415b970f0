"""Processes on this host: whether a pid is still alive."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists (someone else's process counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError and the like: the process is there
        return True
    return True
