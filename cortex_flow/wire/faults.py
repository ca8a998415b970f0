"""Which Redis errors are the server's passing state, not the message's fault.

Out of memory (``maxmemory``), a replica that is read-only during a failover, a server
still loading its data, a cluster slot moving or a master down, a busy script, or no
answer at all: the same command succeeds later. Work that meets one keeps its outcome
and tries again with backoff; it never counts as a delivery or a failure of the message.

A failover shows as ``UNBLOCKED`` (a blocking read ended as the master turned replica),
``READONLY``, ``MOVED``/``ASK`` past the client's redirections, ``TRYAGAIN``,
``CLUSTERDOWN``/``MASTERDOWN``, or the cluster client giving up on a slot: all are
``failover`` (or ``readonly``). redis-py strips the code from the message and keeps it
as ``status_code``; both spellings are recognised.
"""

from __future__ import annotations

from redis.exceptions import ClusterError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# what the cluster client raises of its own (not a server reply) while slots move
CLUSTER_ERRORS = (ClusterError, RedisClusterException)

# the first word of a server error -> the reason shown in logs and metrics
PASSING = {
    "OOM": "oom",
    "READONLY": "readonly",
    "LOADING": "loading",
    "MASTERDOWN": "failover",
    "CLUSTERDOWN": "failover",
    "TRYAGAIN": "failover",
    "UNBLOCKED": "failover",
    "MOVED": "failover",
    "ASK": "failover",
    "BUSY": "busy",
    "MISCONF": "misconf",
}


def passing_reason(error: BaseException | str) -> str | None:
    """``oom``, ``readonly``, ``loading``, ``failover``, ``busy``, ``misconf`` or
    ``unreachable`` when ``error`` is a passing state of Redis; None otherwise.

    Takes an exception or an error text (as a script's ``pcall`` reports it).
    """
    code = getattr(error, "status_code", None)  # first: LOADING is a ConnectionError
    if isinstance(code, str) and code.upper() in PASSING:
        return PASSING[code.upper()]
    if isinstance(error, RedisConnectionError | RedisTimeoutError | ConnectionError | OSError):
        return "unreachable"
    if isinstance(error, CLUSTER_ERRORS) and not isinstance(error, ResponseError):
        return "failover"  # the cluster client ran out of redirections or slot owners
    if isinstance(error, ResponseError | str):
        text = str(error).lstrip("-").lstrip()
        word = text.split(" ", 1)[0].rstrip(":").upper()
        # redis-py may wrap a command's error: "Command # 1 (...) of pipeline caused error: OOM"
        if word not in PASSING and "caused error: " in text:
            word = text.rpartition("caused error: ")[2].lstrip("('\"").split(" ", 1)[0].upper()
        return PASSING.get(word)
    return None


def error_text(error: BaseException) -> str:
    """The error's first line with its Redis code (``READONLY You can't write...``)."""
    text = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    code = getattr(error, "status_code", None)
    if isinstance(code, str) and code and not text.startswith(code):
        return f"{code} {text}"
    return text
