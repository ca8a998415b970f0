"""Sandboxed jinja2 templates and expressions, compiled once at validation time.

Names a template may use at run time:

- ``msg``: the message (its fields, or the decoded object for ``codec: json``)
- ``priority``: the priority level the message was read from (priority streams)
- ``agent`` and any other key variable bound by the group's or route's ``vars``
- ``agents``: the set of declared agent names (``msg.to in agents``)
- ``id``: the entry ID; ``stream``: the source Redis key; ``group``: the group name
- ``deliveries``: how many times Redis has delivered this entry
- ``now``: the current UTC time (``{{ now }}`` renders ISO 8601; ``now.ts`` is epoch seconds)

Undefined names are errors, never empty strings.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import consume

RUNTIME_NAMES = frozenset(
    {"msg", "priority", "agent", "agents", "id", "stream", "group", "deliveries", "now"}
)

__all__ = [
    "RUNTIME_NAMES",
    "Expression",
    "Template",
    "TemplateSyntaxError",
    "compile_expression",
    "compile_template",
    "make_context",
]


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


@lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """The one sandbox every template runs in: no attribute tricks, undefined is an error."""
    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False
    )


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


class Template:
    """A string template; plain strings skip jinja entirely (the hot path stays cheap)."""

    __slots__ = ("_root", "source", "variables")

    def __init__(self, source: str) -> None:
        self.source = source
        env = environment()
        if _is_literal(source):
            self._root: Any = None
            self.variables: frozenset[str] = frozenset()
        else:
            ast = env.parse(source)
            self.variables = frozenset(meta.find_undeclared_variables(ast))
            self._root = env.from_string(source).root_render_func

    @property
    def is_literal(self) -> bool:
        return self._root is None

    def render(self, context: Context) -> str:
        if self._root is None:
            return self.source
        return "".join(self._root(context))


class Expression:
    """A jinja2 expression such as ``msg.type == 'batch'``, evaluated to a Python value."""

    __slots__ = ("_root", "source", "variables")

    def __init__(self, source: str) -> None:
        text = source.strip()
        if text.startswith("{{") and text.endswith("}}"):
            text = text[2:-2]
        self.source = source
        env = environment()
        self.variables = frozenset(
            meta.find_undeclared_variables(env.parse("{{ (" + text + ") }}"))
        )
        compiled = env.compile_expression(text, undefined_to_none=False)
        self._root = compiled._template.root_render_func

    def evaluate(self, context: Context) -> Any:
        consume(self._root(context))
        return context.vars["result"]


def compile_template(source: str) -> Template:
    """Compile a template; raises :class:`TemplateSyntaxError` with a line number."""
    return Template(source)


def compile_expression(source: str) -> Expression:
    """Compile an expression; raises :class:`TemplateSyntaxError` with a line number."""
    return Expression(source)
