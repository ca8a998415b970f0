"""Bounds on what one template render may do: steps, time and the size of what it builds.

A template runs on the runner's event loop, so a render that loops for ever, or builds a
gigabyte string, would stop every group at once. Each render gets a :class:`Budget`:

- ``max_steps`` loop iterations and calls (a counter ticked in every loop body);
- ``timeout`` seconds of wall time (checked at every step and every guarded operation);
- ``max_output`` characters (or items) for any one value it builds and for its output,
  and ten times that for all the values it builds together.

The operators that can build large values (``*``, ``**``, ``+``, ``%``, ``~``), the
filters and the string methods that take a width or a count check the size of their
result *before* building it, so a refused value is never allocated. Going over a bound
raises :class:`TemplateLimitError`: that message fails with the reason, nothing else does.

The same checks fold the constant parts of a template at validation time, so
``{{ 'a' * 10**9 }}`` is an error naming the template, not a 3 GB allocation.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from string import Formatter
from typing import Any

__all__ = [
    "DEFAULT_LIMITS",
    "Budget",
    "TemplateLimitError",
    "TemplateLimits",
    "current_limits",
    "guarded_binop",
    "set_limits",
    "using_limits",
]

CREATED_FACTOR = 10  # all values of one render together: this many times max_output
MAX_INT_BITS = 100_000  # ~30,000 decimal digits: bigger integer arithmetic is refused


class TemplateLimitError(Exception):
    """A render went over one of its bounds; the text says which and how to raise it."""

    def __init__(self, message: str, lineno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.lineno = lineno


@dataclass(frozen=True, slots=True)
class TemplateLimits:
    """The bounds of one render (``templates:`` in config.yaml)."""

    max_steps: int = 1_000_000
    max_output: int = 10_000_000
    timeout: float = 1.0


DEFAULT_LIMITS = TemplateLimits()
_limits = DEFAULT_LIMITS


def current_limits() -> TemplateLimits:
    return _limits


def set_limits(limits: TemplateLimits) -> None:
    """Use ``limits`` for every render from now on (the runner, at start and reload)."""
    global _limits
    _limits = limits


@contextlib.contextmanager
def using_limits(limits: TemplateLimits) -> Iterator[None]:
    """``limits`` for a while (``validate`` folds constants under the config's limits)."""
    previous = current_limits()
    set_limits(limits)
    try:
        yield
    finally:
        set_limits(previous)


class Budget:
    """What one render has left; the active one is per thread (see :func:`run_bounded`)."""

    __slots__ = ("created", "deadline", "limits", "steps")

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.steps = limits.max_steps
        self.created = limits.max_output * CREATED_FACTOR
        self.deadline = time.perf_counter() + limits.timeout

    def tick(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise TemplateLimitError(
                f"template exceeded its step budget of {self.limits.max_steps:,} loop "
                "iterations and calls (templates.max_steps in config.yaml)"
            )
        self.check_time()

    def check_time(self) -> None:
        if time.perf_counter() > self.deadline:
            raise TemplateLimitError(
                f"template exceeded its time limit of {self.limits.timeout:g}s "
                "(templates.timeout in config.yaml)"
            )

    def spend(self, size: int) -> None:
        self.created -= size
        if self.created < 0:
            raise TemplateLimitError(
                f"template exceeded its memory budget: the values it built came to more "
                f"than {self.limits.max_output * CREATED_FACTOR:,} characters "
                f"({CREATED_FACTOR} x templates.max_output in config.yaml)"
            )
        self.check_time()


_local = threading.local()


def _active() -> Budget | None:
    budget: Budget | None = getattr(_local, "budget", None)
    return budget


def run_bounded(chunks: Callable[[], Iterator[str]]) -> str:
    """Render under a fresh budget: the joined chunks, refused past ``max_output``."""
    limits = _limits
    budget = Budget(limits)
    previous = _active()
    _local.budget = budget
    try:
        out: list[str] = []
        size = 0
        for chunk in chunks():
            size += len(chunk)
            if size > limits.max_output:
                raise _too_big("its output", size, limits)
            out.append(chunk)
        return "".join(out)
    finally:
        _local.budget = previous


def tick() -> None:
    """One loop iteration or macro call of the active render."""
    budget = _active()
    if budget is not None:
        budget.tick()


def _too_big(what: str, size: int, limits: TemplateLimits) -> TemplateLimitError:
    return TemplateLimitError(
        f"template exceeded its size limit: {what} would be {size:,} characters or items, "
        f"over templates.max_output ({limits.max_output:,}; set in config.yaml)"
    )


def check_size(what: str, size: int) -> None:
    """Refuse a value of ``size`` characters/items before it is built; count it."""
    limits = _limits
    if size > limits.max_output:
        raise _too_big(what, size, limits)
    budget = _active()
    if budget is not None:
        budget.spend(size)


_SIZED = (str, list, tuple, dict, bytes)  # a tuple: ``A | B`` would be built per call


def _sized(value: Any) -> int | None:
    return len(value) if isinstance(value, _SIZED) else None


def _check_int_bits(op: str, bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimitError(
            f"template exceeded its size limit: {op} would make an integer of about "
            f"{bits:,} bits, over the {MAX_INT_BITS:,} a template may build"
        )


def guarded_binop(op: str, left: Any, right: Any) -> Any:
    """``left op right`` for ``*``, ``**``, ``+`` and ``%``, refused when the result is
    too large to build (checked from the operands' sizes, before it is built)."""
    if op == "*":
        if isinstance(left, int) and isinstance(right, int):
            _check_int_bits("*", left.bit_length() + right.bit_length())
        else:
            count, seq = (right, left) if isinstance(right, int) else (left, right)
            size = _sized(seq)
            if isinstance(count, int) and size is not None:
                check_size(f"{_show(left)} * {_show(right)}", size * max(count, 0))
        return left * right
    if op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0:
            _check_int_bits("**", max(left.bit_length(), 1) * right)
        return left**right
    if op == "+":
        left_size, right_size = _sized(left), _sized(right)
        if left_size is not None and right_size is not None:
            check_size("a + b", left_size + right_size)
        return left + right
    if op == "%":
        if isinstance(left, str):
            check_percent_format(left, right)
            result = left % right
            check_size("a % b", len(result))
            return result
        return left % right
    raise ValueError(f"no guarded operator {op!r}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 20 else text[:17] + "..."


def guarded_concat(parts: Sequence[Any]) -> str:
    """``a ~ b ~ c``: the strings joined, refused past ``max_output``."""
    texts = [p if isinstance(p, str) else str(p) for p in parts]
    check_size("a ~ b", sum(map(len, texts)))
    return "".join(texts)


def _width_check(what: str, number: int) -> None:
    limits = _limits
    if number > limits.max_output:
        raise _too_big(what, number, limits)


_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _ints(args: Any) -> list[int]:
    values = args if isinstance(args, (tuple, list)) else [args]
    if isinstance(args, Mapping):
        values = list(args.values())
    return [v for v in values if isinstance(v, int)]


def check_percent_format(fmt: str, args: Any) -> None:
    """``'%10d' % x``: a width or precision past ``max_output`` is refused."""
    for match in _PERCENT.finditer(fmt):
        for number in match.groups():
            if number == "*":
                for value in _ints(args):
                    _width_check("a %* width", value)
            elif number is not None:
                _width_check(f"a %{number} width", int(number))


_DIGITS = re.compile(r"\d+")


def check_str_format(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """``'{:>10}'.format(x)``: widths past ``max_output`` are refused (nested ones too)."""
    try:
        parsed = list(Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    for _, _, spec, _ in parsed:
        if not spec:
            continue
        if "{" in spec:
            for value in [*_ints(list(args)), *_ints(dict(kwargs))]:
                _width_check("a {:{}} width", value)
        for number in _DIGITS.findall(spec):
            _width_check("a {:N} width", int(number))


def account(value: Any) -> Any:
    """Count a built value against the active budget (and refuse it past max_output)."""
    if isinstance(value, _SIZED):
        size = len(value)
        if size > _limits.max_output or getattr(_local, "budget", None) is not None:
            check_size("a value", size)
    return value
