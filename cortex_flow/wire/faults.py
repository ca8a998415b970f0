"""Which Redis errors are the server's passing state, not the message's fault.

Out of memory (``maxmemory``), a replica that is read-only during a failover, a server
still loading its data, a cluster slot moving or a master down, a busy script, or no
answer at all: the same command succeeds later. Work that meets one keeps its outcome
and tries again with backoff; it never counts as a delivery or a failure of the message.
"""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# the first word of a server error -> the reason shown in logs and metrics
PASSING = {
    "OOM": "oom",
    "READONLY": "readonly",
    "LOADING": "loading",
    "MASTERDOWN": "failover",
    "CLUSTERDOWN": "failover",
    "TRYAGAIN": "failover",
    "BUSY": "busy",
    "MISCONF": "misconf",
}


def passing_reason(error: BaseException | str) -> str | None:
    """``oom``, ``readonly``, ``loading``, ``failover``, ``busy``, ``misconf`` or
    ``unreachable`` when ``error`` is a passing state of Redis; None otherwise.

    Takes an exception or an error text (as a script's ``pcall`` reports it).
    """
    if isinstance(error, RedisConnectionError | RedisTimeoutError | ConnectionError | OSError):
        return "unreachable"
    if isinstance(error, ResponseError | str):
        text = str(error).lstrip("-").lstrip()
        word = text.split(" ", 1)[0].rstrip(":").upper()
        # redis-py may wrap a command's error: "Command # 1 (...) of pipeline caused error: OOM"
        if word not in PASSING and "caused error: " in text:
            word = text.rpartition("caused error: ")[2].lstrip("('\"").split(" ", 1)[0].upper()
        return PASSING.get(word)
    return None
