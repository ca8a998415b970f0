"""Sandboxed jinja2 templates and expressions, checked once at validation time.

Names a template may use at run time:

- ``msg``: the message (its fields, or the decoded object for ``codec: json``)
- ``priority``: the priority level the message was read from (priority streams)
- ``agent`` and any other key variable bound by the group's or route's ``vars``
- ``agents``: the set of declared agent names (``msg.to in agents``)
- ``id``: the entry ID; ``stream``: the source Redis key; ``group``: the group name
- ``deliveries``: how many times Redis has delivered this entry
- ``now``: the current UTC time (``{{ now }}`` renders ISO 8601; ``now.ts`` is epoch seconds)

Undefined names are errors (caught by `validate`). A field a message lacks is an error in
a template (vars, set, keys) and undefined, hence falsy, in a `when` expression.

Validation must stay fast on thousands of files, so the work is split: a
template is parsed (syntax errors, names, filters and tests) when it is built,
and turned into Python code only when it is first rendered. Text made only of
literal parts and ``{{ name }}`` / ``{{ name.attr }}`` placeholders (most Redis
keys and ``vars``) is not even parsed by jinja2: its names are read with a
regular expression, and ``{{ name }}`` with a string value renders without
jinja2 at all.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from jinja2 import ChainableUndefined, StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import TemplateAssertionError
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import consume
from jinja2.visitor import NodeTransformer

from cortex_flow.flow.limits import TemplateLimitError, run_bounded
from cortex_flow.flow.sandbox import BoundedSandbox, bound, fold_constants, needs_budget

RUNTIME_NAMES = frozenset(
    {"msg", "priority", "agent", "agents", "id", "stream", "group", "deliveries", "now"}
)

__all__ = [
    "RUNTIME_NAMES",
    "Expression",
    "Template",
    "TemplateLimitError",
    "TemplateSyntaxError",
    "builtin_names",
    "compile_expression",
    "compile_template",
    "context_base",
    "context_over",
    "make_context",
]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PLACEHOLDER = re.compile(rf"\{{\{{[ \t]*({_IDENT})((?:\.{_IDENT})*)[ \t]*\}}\}}")
# words jinja2 reads as constants or operators, never as variable names
_RESERVED = frozenset(
    {"true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is", "if"}
    | {"else"}
)
_MARKERS = ("{{", "{%", "{#")
_Render = Callable[[Context], Iterator[str]]


class Now:
    """The current time, rendered lazily: ``{{ now }}`` is ISO 8601 UTC."""

    __slots__ = ("ts",)

    def __init__(self) -> None:
        self.ts = time.time()

    def __str__(self) -> str:
        return datetime.fromtimestamp(self.ts, UTC).isoformat(timespec="milliseconds")

    @property
    def iso(self) -> str:
        return str(self)


class _Sandbox(BoundedSandbox):
    """The bounded sandbox (:mod:`cortex_flow.flow.sandbox`), with a quick path for a
    message field that is not there.

    jinja2 falls back from ``msg["to"]`` to the attribute ``dict.to`` before it gives
    up, raising and catching twice; a message's fields are items, never attributes.
    """

    def getitem(self, obj: Any, argument: Any) -> Any:
        if type(obj) is dict and type(argument) is str:
            try:
                return obj[argument]
            except KeyError:
                return self.undefined(obj=obj, name=argument)
        return super().getitem(obj, argument)


@lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """The one sandbox every template runs in: no attribute tricks, undefined is an error."""
    return _Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


@lru_cache(maxsize=1)
def condition_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox ``when`` expressions run in: a missing message field is just falsy.

    Names are still checked when the flows are validated; what this forgives is a field
    a message does not carry (``msg.to in agents`` for a message without ``to``), which
    means "no match". Evaluating it as a falsy undefined instead of raising and catching
    an error per message is several times cheaper on the hot path.
    """
    return _Sandbox(undefined=ChainableUndefined, autoescape=False, keep_trailing_newline=False)


def _is_literal(source: str) -> bool:
    return "{{" not in source and "{%" not in source and "{#" not in source


def make_context(values: Mapping[str, Any]) -> Context:
    """One render context per message, shared by every template and expression it meets.

    Building the context directly, rather than through ``Template.render``, skips
    jinja's per-call ChainMap of globals: it is most of the cost of a small template.
    """
    env = environment()
    return Context(env, {**_globals(), **values}, None, {})


@lru_cache(maxsize=1)
def _globals() -> dict[str, Any]:
    return dict(environment().globals)


def builtin_names() -> frozenset[str]:
    """Names every template may use besides the context: jinja2's globals (``range``, ...)."""
    return frozenset(_globals())


def context_base(values: Mapping[str, Any]) -> dict[str, Any]:
    """The sandbox's globals overlaid with ``values``: a base for :func:`context_over`.

    A hot path builds it once (per source key, say), then per message copies it, sets
    the message's own names and calls :func:`context_over`: the same context as
    :func:`make_context` gives, without merging the globals each time.
    """
    return {**_globals(), **values}


def context_over(values: dict[str, Any]) -> Context:
    """A render context over ``values``, which already hold the globals (see
    :func:`context_base`). ``values`` is used as is, not copied: one dict per message."""
    return Context(environment(), values, None, {})


def _simple_parts(source: str) -> tuple[tuple[str, str, bool], ...] | None:
    """``(text before, name, has attributes)`` per placeholder, or None if not that simple.

    The last part holds the trailing text and an empty name. Sources with a newline
    are left to jinja2, which drops one trailing newline.
    """
    if "\n" in source or "\r" in source:
        return None
    parts: list[tuple[str, str, bool]] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(source):
        text = source[pos : match.start()]
        if any(m in text for m in _MARKERS) or match.group(1) in _RESERVED:
            return None
        parts.append((text, match.group(1), bool(match.group(2))))
        pos = match.end()
    tail = source[pos:]
    if any(m in tail for m in _MARKERS):
        return None
    parts.append((tail, "", False))
    return tuple(parts)


def _check_filters_and_tests(ast: nodes.Node) -> None:
    """Raise for an unknown filter or test, as jinja2's compiler would (even under ``if``)."""
    env = environment()
    for node in ast.find_all((nodes.Filter, nodes.Test)):
        assert isinstance(node, nodes.Filter | nodes.Test)
        is_filter = isinstance(node, nodes.Filter)
        known = env.filters if is_filter else env.tests
        if node.name not in known:
            kind = "filter" if is_filter else "test"
            raise TemplateAssertionError(f"no {kind} named {node.name!r}", node.lineno)


def _only_output(ast: nodes.Template) -> bool:
    """Whether the template is text and ``{{ }}`` only: then compiling cannot fail."""
    return all(isinstance(node, nodes.Output) for node in ast.body)


# Attribute names of a dict, and of the ``dict`` type (a global, subscriptable as dict[...]).
# For any other name, ``x.name`` and ``x["name"]`` resolve alike in the sandbox: getattr
# tries the attribute then the item, getitem the item then the attribute, and they differ
# only when both exist, which for the values a template sees (messages, JSON values,
# strings, numbers, ``now``, jinja2 helpers) needs a dict or a subscriptable type.
_DICT_NAMES = frozenset(dir(dict)) | frozenset(dir(type))


class _ItemFirst(NodeTransformer):
    """``msg.kind`` as ``msg["kind"]``, where that is the same (see ``_DICT_NAMES``).

    On a message, the attribute-first lookup raises and catches an AttributeError each
    time: the item-first one is several times faster, and ``msg.field`` is the common case.
    """

    def visit_Getattr(self, node: nodes.Getattr) -> nodes.Node:
        self.generic_visit(node)  # in place: the children first
        if node.attr in _DICT_NAMES or node.ctx != "load":
            return node
        return nodes.Getitem(node.node, nodes.Const(node.attr), "load", lineno=node.lineno)


def _compile(ast: nodes.Template, env: ImmutableSandboxedEnvironment | None = None) -> _Render:
    env = env or environment()
    ast = bound(_ItemFirst().visit(ast))
    ast.set_environment(env)
    template = env.template_class.from_code(env, env.compile(ast), env.make_globals(None), None)
    return template.root_render_func


class Template:
    """A string template; plain strings and plain placeholders skip jinja2 when they can."""

    __slots__ = ("_ast", "_budget", "_literal", "_parts", "_root", "source", "variables")

    def __init__(
        self, source: str, transform: Callable[[nodes.Template], nodes.Template] | None = None
    ) -> None:
        """``transform`` rewrites the parsed template before it is compiled (an ``http``
        URL percent-encodes what its placeholders print); it takes jinja2's path always."""
        self.source = source
        self._literal = _is_literal(source)
        self._parts: tuple[tuple[str, str, bool], ...] | None = None
        self._ast: nodes.Template | None = None
        self._root: _Render | None = None
        self._budget = False  # loops or calls: render under a step and time budget
        if self._literal:
            self.variables: frozenset[str] = frozenset()
            return
        self._parts = _simple_parts(source) if transform is None else None
        if self._parts is not None:
            self.variables = frozenset(name for _, name, _ in self._parts if name)
            return
        ast = environment().parse(source)
        _check_filters_and_tests(ast)
        fold_constants(ast)
        self._budget = needs_budget(ast)
        self.variables = frozenset(meta.find_undeclared_variables(ast))
        if transform is not None:
            ast = transform(ast)
        if _only_output(ast):
            self._ast = ast
        else:  # statements ({% for %}, macros, ...) can fail to compile: find out now
            self._root = _compile(ast)

    @property
    def is_literal(self) -> bool:
        return self._literal

    def _render_func(self) -> _Render:
        if self._root is None:
            ast = self._ast if self._ast is not None else environment().parse(self.source)
            self._root = _compile(ast)
            self._ast = None
        return self._root

    def render(self, context: Context) -> str:
        if self._literal:
            return self.source
        if self._parts is not None:
            text = self._substitute(context.resolve_or_missing)
            if text is not None:
                return text
        render = self._render_func()
        if not self._budget:
            return "".join(render(context))
        return run_bounded(lambda: render(context))

    def render_values(self, values: Mapping[str, Any]) -> str:
        """Render from plain values (a Redis key from its variables) without a jinja context."""
        if self._literal:
            return self.source
        if self._parts is not None:
            text = self._substitute(values.get)
            if text is not None:
                return text
        return self.render(make_context(values))

    def _substitute(self, lookup: Callable[[str], Any]) -> str | None:
        """The rendered text when every placeholder is a plain name with a string value."""
        assert self._parts is not None
        out = []
        for text, name, attrs in self._parts:
            out.append(text)
            if name:
                value = lookup(name)
                if attrs or not isinstance(value, str):
                    return None  # attributes, undefined names and non-strings: jinja2 decides
                out.append(value)
        return "".join(out)


def _parse_expression(text: str) -> nodes.Expr:
    parser = Parser(environment(), text, state="variable")
    try:
        expr = parser.parse_expression()
    except TemplateSyntaxError as exc:
        message = (exc.message or "").replace("end of template", "end of expression")
        raise TemplateSyntaxError(message, exc.lineno) from None
    if not parser.stream.eos:
        token = parser.stream.current
        raise TemplateSyntaxError(
            f"unexpected {token.value!r} after the end of the expression", token.lineno
        )
    expr.set_environment(environment())
    return expr


class Expression:
    """A jinja2 expression such as ``msg.type == 'batch'``, evaluated to a Python value."""

    __slots__ = ("_budget", "_expr", "_root", "source", "variables")

    def __init__(self, source: str) -> None:
        text = source.strip()
        if text.startswith("{{") and text.endswith("}}"):
            text = text[2:-2]
        self.source = source
        expr = _parse_expression(text)
        _check_filters_and_tests(expr)
        fold_constants(expr)
        self._budget = needs_budget(expr)
        wrapper = nodes.Template([nodes.Output([expr])], lineno=1)
        wrapper.set_environment(environment())
        self.variables = frozenset(meta.find_undeclared_variables(wrapper))
        self._expr: nodes.Expr | None = expr
        self._root: _Render | None = None

    def _render_func(self) -> _Render:
        if self._root is None:
            assert self._expr is not None
            body = [nodes.Assign(nodes.Name("result", "store"), self._expr, lineno=1)]
            ast = nodes.Template(body, lineno=1)
            env = condition_environment()
            ast.set_environment(env)
            self._root = _compile(ast, env)
            self._expr = None
        return self._root

    def evaluate(self, context: Context) -> Any:
        render = self._render_func()
        if self._budget:
            run_bounded(lambda: render(context))
        else:
            consume(render(context))
        return context.vars["result"]


def compile_template(source: str) -> Template:
    """Compile a template; raises :class:`TemplateSyntaxError` with a line number."""
    return Template(source)


def compile_expression(source: str) -> Expression:
    """Compile an expression; raises :class:`TemplateSyntaxError` with a line number."""
    return Expression(source)
