"""Call targets (``module.path:function``): importing them, and ``--check-imports``."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from cortex_flow.errors import Problem
from cortex_flow.flow.calltargets import origin_of, refused_object
from cortex_flow.flow.declared import Topology


def check_imports(
    topo: Topology, allow: Sequence[str] = (), origins: list[str] | None = None
) -> list[Problem]:
    """Import every ``call`` target (``--check-imports``); report what fails, and what is
    refused by the module it comes from (``calls.allow`` lets module prefixes through).

    ``origins``, when given, gets one line per target saying where it comes from.
    """
    problems = []
    for name, group in topo.groups.items():
        for index, route in enumerate(group.routes):
            if route.call is None:
                continue
            target = route.call.function
            origin = topo.origin("groups", name)
            sub = ("routes", index, "call")
            try:
                fn = resolve_callable(target)
            except Exception as exc:  # an import runs user code: any error is a finding
                problems.append(origin.problem(sub, _import_message(target, exc)))
                continue
            refused = refused_object(target, fn, allow)
            if refused is not None:
                problems.append(origin.problem(sub, refused))
            if origins is not None:
                where = origin.problem(sub, "")
                origins.append(f"{where.file}:{where.line}:{where.col}: {target}: {origin_of(fn)}")
    return problems


def _import_message(target: str, exc: Exception) -> str:
    module_name, _, attr = target.partition(":")
    if isinstance(exc, ModuleNotFoundError) and exc.name and module_name.startswith(exc.name):
        return (
            f'cannot import "{target}": no module named "{exc.name}"; install it, or put it '
            "in the folder that holds config.yaml"
        )
    if isinstance(exc, AttributeError):
        return f'cannot import "{target}": module "{module_name}" has no attribute "{attr}"'
    if isinstance(exc, TypeError) and str(exc).endswith("is not callable"):
        return f'"{target}" is not callable; point call at a function'
    return f'cannot import "{target}": importing it raised {type(exc).__name__}: {exc}'


def resolve_callable(target: str) -> object:
    """Import ``module.path:function`` and return the callable."""
    module_name, _, attr = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


@contextlib.contextmanager
def importable_from(base_dir: Path) -> Iterator[None]:
    """Let ``call`` targets import from the folder that holds config.yaml, for a while.

    ``cortex-flow run`` puts that folder on ``sys.path`` for good (as ``python -m`` would
    from there); a library user's runner only needs it while call targets are imported.
    """
    folder = str(base_dir)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)
