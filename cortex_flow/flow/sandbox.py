"""The jinja2 sandbox templates run in, with the bounds of :mod:`cortex_flow.flow.limits`.

On top of jinja2's immutable sandbox (no attribute tricks, no mutating lists or dicts):

- ``*``, ``**``, ``+`` and ``%`` are intercepted (so jinja2 never folds them at compile
  time) and refused when their result would be too large; ``~`` is rewritten to a
  checked join;
- every loop body ticks the render's step budget, and so does every call (macros too);
- filters and string methods that take a width or a count are checked before they run,
  and what any filter or call returns is counted against the render's size budget;
- ``lipsum`` (a text generator with a count) is not offered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from cortex_flow.flow import limits
from cortex_flow.flow.limits import (
    TemplateLimitError,
    account,
    check_percent_format,
    check_size,
    check_str_format,
    guarded_binop,
    guarded_concat,
)

__all__ = ["BoundedSandbox", "bound", "fold_constants", "needs_budget"]

_SEQUENCES = (list, tuple, str)
GUARDED_BINOPS = frozenset({"*", "**", "+", "%"})
TICK = "_cortex_tick"
CONCAT = "_cortex_concat"


@pass_context
def _tick(context: Context, value: Any) -> None:
    limits.tick()


def _concat(parts: list[Any]) -> str:
    return guarded_concat(parts)


def _width(
    name: str, index: int, keyword: str
) -> Callable[[tuple[Any, ...], dict[str, Any]], None]:
    """A check that the ``index``-th argument (or ``keyword``) of a filter is not too large."""

    def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        value = args[index] if len(args) > index else kwargs.get(keyword)
        if isinstance(value, int) and value > limits.current_limits().max_output:
            check_size(f"|{name}({value})", value)

    return check


_TEXTS = (str, bytes)


def _replace(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if len(args) < 3 or not all(isinstance(a, _TEXTS) for a in args[:3]):
        return
    text, old, new = args[:3]
    count = args[3] if len(args) > 3 else kwargs.get("count")
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    check_size("|replace", len(text) + hits * (len(new) - len(old)))


def _format(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if args and isinstance(args[0], str):
        check_percent_format(args[0], kwargs or args[1:])


def _join(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if len(args) < 1 or not isinstance(args[0], _SEQUENCES):
        return
    items = args[0]
    sep = args[1] if len(args) > 1 else kwargs.get("d", "")
    sep_len = len(sep) if isinstance(sep, str) else 0
    texts = sum(len(i) for i in items if isinstance(i, str))
    check_size("|join", texts + sep_len * max(len(items) - 1, 0))


_PRECHECKS: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], None]] = {
    "center": _width("center", 1, "width"),
    "indent": _width("indent", 1, "width"),
    "wordwrap": _width("wordwrap", 1, "width"),
    "batch": _width("batch", 1, "linecount"),
    "slice": _width("slice", 1, "slices"),
    "truncate": _width("truncate", 1, "length"),
    "tojson": _width("tojson", 1, "indent"),
    "replace": _replace,
    "format": _format,
    "join": _join,
}


def _guard_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    skip = 0 if getattr(fn, "jinja_pass_arg", None) is None else 1  # context/env first
    precheck = _PRECHECKS.get(name)

    def checked(*args: Any, **kwargs: Any) -> Any:
        if name == "join" and len(args) > skip and not isinstance(args[skip], _SEQUENCES):
            args = (*args[:skip], list(args[skip]), *args[skip + 1 :])  # sized before joined
        if precheck is not None:
            precheck(args[skip:], kwargs)
        if name == "sum" and len(args) > skip and isinstance(args[skip], (list, tuple)):
            start = args[skip + 2] if len(args) > skip + 2 else kwargs.get("start", 0)
            return _sum(args[skip], start, fn, args, kwargs)
        return account(fn(*args, **kwargs))

    def counted(*args: Any, **kwargs: Any) -> Any:  # the common case, kept short
        return account(fn(*args, **kwargs))

    guarded = checked if precheck is not None or name in ("join", "sum") else counted
    return functools.wraps(fn)(guarded)


def _sum(items: Any, start: Any, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """``|sum`` of lists is joined in one pass (Python's sum copies at every step)."""
    if isinstance(start, list) and all(isinstance(i, list) for i in items):
        check_size("|sum", len(start) + sum(len(i) for i in items))
        return [*start, *chain.from_iterable(items)]
    return account(fn(*args, **kwargs))


# str methods whose result can be much longer than the string: the argument that says how much
_STR_WIDTHS = {"ljust": 0, "rjust": 0, "center": 0, "zfill": 0}


def _check_str_call(method: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    wrapped = getattr(method, "__wrapped__", method)  # the sandbox wraps str.format
    text = getattr(wrapped, "__self__", None)
    if not isinstance(text, _TEXTS):
        return
    name = getattr(wrapped, "__name__", "")
    if name in _STR_WIDTHS and args and isinstance(args[0], int):
        check_size(f"str.{name}({args[0]})", max(args[0], len(text)))
    elif name == "expandtabs":
        size = args[0] if args and isinstance(args[0], int) else 8
        check_size("str.expandtabs", len(text) * max(size, 1))
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        items = args[0]
        texts = sum(len(i) for i in items if isinstance(i, _TEXTS))
        check_size("str.join", texts + len(text) * max(len(items) - 1, 0))
    elif name == "replace":
        _replace((text, *args), dict(kwargs))
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        check_size("str.translate", len(text) * max(longest, 1))
    elif name == "format" and isinstance(text, str):
        check_str_format(text, args, kwargs)
    elif name == "format_map" and isinstance(text, str) and args and isinstance(args[0], Mapping):
        check_str_format(text, (), args[0])


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the render bounds (see the module's docstring)."""

    intercepted_binops = GUARDED_BINOPS

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals.pop("lipsum", None)
        self.filters = {name: _guard_filter(name, fn) for name, fn in self.filters.items()}
        self.filters[TICK] = _tick
        self.filters[CONCAT] = _concat

    @staticmethod
    def concat(parts: Iterable[str]) -> str:
        """What a macro, ``{% set %}...{% endset %}`` or ``{% filter %}`` block built."""
        texts = list(parts)
        check_size("a block's output", sum(map(len, texts)))
        return "".join(texts)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        return guarded_binop(operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        limits.tick()
        _check_str_call(__obj, args, kwargs)
        return account(super().call(__context, __obj, *args, **kwargs))


class _Bound(NodeTransformer):
    """A tick at the top of every loop body; ``a ~ b`` through the checked join."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        tick = nodes.Filter(nodes.Const(None), TICK, [], [], None, None, lineno=node.lineno)
        node.body.insert(0, nodes.ExprStmt(tick, lineno=node.lineno))
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        parts = nodes.List(list(node.nodes), lineno=node.lineno)
        return nodes.Filter(parts, CONCAT, [], [], None, None, lineno=node.lineno)


# what can repeat work within one render: without these, a render does a fixed number of
# guarded operations (each refused past max_output), so it needs no budget of its own
_REPEATING = (nodes.For, nodes.Macro, nodes.CallBlock, nodes.Call)


def needs_budget(ast: nodes.Node) -> bool:
    """Whether rendering ``ast`` can loop or call (then it runs under a :class:`Budget`)."""
    return any(True for _ in ast.find_all(_REPEATING))


def bound(ast: nodes.Template) -> nodes.Template:
    """``ast`` with the step ticks and checked joins (before it is compiled)."""
    result = _Bound().visit(ast)
    assert isinstance(result, nodes.Template)
    return result


class _NotConstant(Exception):
    pass


_BIN: dict[type[nodes.Node], str] = {
    nodes.Mul: "*",
    nodes.Pow: "**",
    nodes.Add: "+",
    nodes.Mod: "%",
}


def _fold(node: nodes.Node) -> Any:
    """The value of a constant expression, through the guarded operators."""
    if isinstance(node, nodes.Const):
        return node.value
    if isinstance(node, nodes.Neg):
        return -_fold(node.node)
    if isinstance(node, nodes.List | nodes.Tuple):
        return [_fold(item) for item in node.items]
    if isinstance(node, nodes.Concat):
        return guarded_concat([_fold(item) for item in node.nodes])
    op = _BIN.get(type(node))
    if op is not None:
        assert isinstance(node, nodes.BinExpr)
        try:
            return guarded_binop(op, _fold(node.left), _fold(node.right))
        except TemplateLimitError:
            raise
        except Exception:
            raise _NotConstant() from None
    raise _NotConstant()


def fold_constants(ast: nodes.Node) -> None:
    """Raise :class:`TemplateLimitError` (with its line) for a constant part of a template
    that is already over a bound: ``{{ 'a' * 10**9 }}`` fails validation, cheaply."""
    for node in ast.find_all((nodes.BinExpr, nodes.Concat)):
        if not isinstance(node, nodes.Concat) and type(node) not in _BIN:
            continue
        try:
            _fold(node)
        except _NotConstant:
            continue
        except TemplateLimitError as exc:
            raise TemplateLimitError(exc.message, node.lineno) from None
