"""Small cortex-flow projects built in a test's tmp_path, and ways to run them.

Flow text uses two placeholders, replaced by plain ``str.replace`` so jinja2's ``{{ }}``
needs no escaping: ``{P}`` is the test's key prefix and ``{M}`` the handler module.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from cortex_flow.flow.loader import load_project
from cortex_flow.runtime.runner import Runner

Predicate = Callable[[], Any]

# the ``new_project`` fixture: (flows, handlers="", **make_project options) -> (config, module)
NewProject = Callable[..., tuple[Path, str]]


async def wait_for(pred: Predicate, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``pred`` (sync or async) until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def wait_for_sync(pred: Predicate, timeout: float = 10.0, what: str = "condition") -> Any:
    """``wait_for`` for plain (non-async) tests."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def write_module(folder: Path, source: str) -> str:
    """Write handler code as a uniquely named module in ``folder``; returns its name."""
    name = f"handlers_{uuid.uuid4().hex[:10]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()
    return name


def peak_handlers(pause: float) -> str:
    """Handler source: ``handle`` appends each ``n`` to ``handled`` after ``pause`` seconds.

    ``peak`` is the most calls that ran at once (for concurrency limits).
    """
    return f"""
    import asyncio

    running = 0
    peak = 0
    handled = []

    async def handle(msg):
        global running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep({pause})
        running -= 1
        handled.append(msg["n"])
    """


def module(name: str) -> ModuleType:
    """The handler module as the in-process runner imported it."""
    return sys.modules[name]


def make_project(
    folder: Path,
    flows: str,
    *,
    url: str,
    name: str = "t1",
    grace: str = "10s",
    runner_extra: str = "",
    **options: str,
) -> Path:
    """Write ``flows/main.yaml`` and a config for ``url``; returns the config path.

    ``options`` (``prefix``, ``mod``, ``config_name``) are ``write_project``'s.
    """
    config = (
        f"redis: {{url: '{url}'}}\n"
        "flows: flows/\n"
        f"runner: {{name: {name}, shutdown_grace: {grace}{runner_extra}}}\n"
        "reload: {watch: false}\n"
        "admin: {listen: 'off'}\n"
        "log: {level: info}\n"
    )
    return write_project(folder, flows, config=config, **options)


def write_project(
    folder: Path,
    flows: str,
    *,
    config: str,
    prefix: str = "",
    mod: str = "",
    config_name: str = "config.yaml",
) -> Path:
    """Write ``flows/main.yaml`` and ``config_name`` (``config``); returns the config path.

    The flows are dedented, ``{P}`` replaced by ``prefix`` and ``{M}`` by ``mod``.
    """
    (folder / "flows").mkdir(parents=True, exist_ok=True)
    text = textwrap.dedent(flows).replace("{P}", prefix).replace("{M}", mod)
    (folder / "flows" / "main.yaml").write_text(text)
    path = folder / config_name
    path.write_text(config)
    return path


@asynccontextmanager
async def running(config: Path, *, grace: float = 5.0, **kwargs: Any) -> AsyncIterator[Runner]:
    """A started in-process runner for ``config``, drained and stopped on exit."""
    runner = Runner(load_project(config), admin=False, watcher=None, block=0.2, **kwargs)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.stop(grace)


async def pending(client: Any, key: str, group: str) -> int:
    """How many entries of ``key`` are pending in ``group`` (XPENDING summary)."""
    return int((await client.xpending(key, group))["pending"])


async def none_pending(client: Any, key: str, group: str) -> bool:
    """Whether nothing of ``key`` is pending in ``group`` (a ``wait_for`` predicate)."""
    return await pending(client, key, group) == 0


async def equals(value: Awaitable[Any], expected: Any) -> bool:
    """Whether ``value``, once awaited, equals ``expected`` (a ``wait_for`` predicate)."""
    return bool(await value == expected)


async def entries(client: Any, key: str) -> list[tuple[str, dict[str, str]]]:
    """Every entry of a stream, oldest first."""
    return [(i, f) for i, f in await client.xrange(key)]


def spawn_runner(
    config: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``cortex-flow run --config CONFIG`` as a child process, its output into ``log``."""
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cortex_flow", "run", "--config", str(config)],
            cwd=config.parent,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


def end(process: subprocess.Popen[str]) -> None:
    """Kill a child runner left running by a failed test (by its own pid)."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def lines(path: Path) -> list[str]:
    """The complete lines of a file that may still be growing (missing file: none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
