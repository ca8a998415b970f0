"""Which ``call`` targets a flow may name, and where a target comes from.

A ``call`` runs ``function(message)``. Pointed at the standard library's process, code,
file or network entry points (``subprocess:run``, ``os:system``, ``builtins:eval``, ...),
it runs what a message says, so those modules are refused unless ``calls.allow`` in
config.yaml lists a prefix of the module (``calls: {allow: [subprocess]}``). The check
reads the target's module name (``validate``), and the module the imported object was
defined in (``validate --check-imports`` and the runner), so ``mymod:run`` where mymod
does ``from subprocess import run`` is refused too. It guards against a slip and against
messages choosing commands; it is no sandbox: a flow file is code (see docs/operating.md).
"""

from __future__ import annotations

import functools
import sys
import sysconfig
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from cortex_flow.errors import Problem
from cortex_flow.flow.declared import Topology

__all__ = ["REFUSED_MODULES", "check_call_targets", "origin_of", "refused_object", "refused_target"]

_PROCESS = "runs processes or signals"
_CODE = "evaluates or loads code"
_FILES = "reads or writes files"
_NETWORK = "opens network connections"
_RUNTIME = "changes the interpreter itself"


def _each(names: str, what: str) -> dict[str, str]:
    return {name: what for name in names.split()}


# module (and its submodules) -> what it can do with a message as its argument
REFUSED_MODULES: dict[str, str] = {
    **_each(
        "os posix nt subprocess _posixsubprocess pty multiprocessing signal _signal asyncio "
        "webbrowser",
        _PROCESS,
    ),
    **_each(
        "builtins importlib runpy code codeop ctypes _ctypes pickle _pickle marshal shelve dill "
        "cProfile profile pdb bdb timeit trace doctest pydoc zipimport pkgutil logging.config "
        "compileall py_compile copyreg site",
        _CODE,
    ),
    **_each(
        "shutil io _io pathlib tempfile glob fileinput zipfile tarfile sqlite3 dbm mmap fcntl "
        "linecache filecmp",
        _FILES,
    ),
    **_each(
        "socket _socket ssl urllib http ftplib smtplib poplib imaplib telnetlib xmlrpc "
        "socketserver",
        _NETWORK,
    ),
    **_each("sys ensurepip venv resource faulthandler atexit", _RUNTIME),
}


def _covers(prefix: str, module: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _refusal(module: str, allow: Sequence[str]) -> str | None:
    if any(_covers(p, module) for p in allow):
        return None
    for name in sorted(REFUSED_MODULES, key=len, reverse=True):
        if _covers(name, module):
            return f"module {module} {REFUSED_MODULES[name]}"
    return None


def _message(target: str, why: str, module: str) -> str:
    top = module.split(".")[0]
    return (
        f'call target "{target}" is refused: {why}, so a message could make the runner do '
        f"anything; call a function of your own, or if this is intended allow it in "
        f"config.yaml: calls: {{allow: [{top}]}}"
    )


def refused_target(target: str, allow: Sequence[str]) -> str | None:
    """Why ``module:function`` is refused by its module's name, or None."""
    module = target.partition(":")[0]
    why = _refusal(module, allow)
    return None if why is None else _message(target, why, module)


def defining_module(obj: object) -> str | None:
    """The module an object was defined in (through ``functools.partial`` and methods)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    owner = getattr(obj, "__self__", None)
    if owner is not None and not isinstance(owner, type(sys)):
        obj = owner if isinstance(owner, type) else type(owner)
    module = getattr(obj, "__module__", None)
    return module if isinstance(module, str) else None


def refused_object(target: str, obj: object, allow: Sequence[str]) -> str | None:
    """Why the imported ``obj`` is refused by the module it was defined in, or None."""
    named = refused_target(target, allow)
    if named is not None:
        return named
    module = defining_module(obj)
    if module is None:
        return None
    why = _refusal(module, allow)
    if why is None:
        return None
    return _message(target, f"it is {module}.{getattr(obj, '__name__', '?')}: {why}", module)


def check_call_targets(topo: Topology, allow: Sequence[str]) -> list[Problem]:
    """Every ``call`` target whose module name is refused (no import needed)."""
    problems = []
    for name, group in topo.groups.items():
        for index, route in enumerate(group.routes):
            if route.call is None:
                continue
            why = refused_target(route.call.function, allow)
            if why is not None:
                problems.append(topo.origin("groups", name).problem(("routes", index, "call"), why))
    return problems


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def origin_of(obj: object) -> str:
    """Where ``obj`` comes from: "standard library", "installed package NAME", or a path."""
    module_name = defining_module(obj) or ""
    top = module_name.split(".")[0]
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if top in sys.stdlib_module_names or top == "builtins":
        return f"module {module_name}, standard library"
    if file is None:
        return f"module {module_name}"
    path = Path(file).resolve()
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    if path.is_relative_to(purelib) or "site-packages" in path.parts:
        dists = _distributions().get(top)
        name = dists[0] if dists else top
        return f"module {module_name}, installed package {name} ({path})"
    return f"module {module_name} ({path})"
