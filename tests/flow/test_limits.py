"""Template and ``when`` bounds: hostile templates fail their render, quickly and cheaply."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cortex_flow.flow.limits import TemplateLimitError, TemplateLimits, using_limits
from cortex_flow.flow.templates import Expression, Template, make_context

NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}"


def render(source: str, **msg: Any) -> str:
    return Template(source).render(make_context({"msg": msg}))


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (NESTED, "(step budget|time limit)"),
        (
            "{% macro f(n) %}{{ n }}{% endmacro %}{% for i in range(100000) %}{% for j in "
            "range(100000) %}{{ f(j) }}{% endfor %}{% endfor %}",
            "(step budget|time limit)",
        ),
        ("{{ msg.a * 100000000 }}", "size limit"),
        ("{{ 'x'|center(10**9) }}", "size limit"),
        ("{{ 'x'.ljust(10**9) }}", "size limit"),
        ("{{ '{:>1000000000}'.format(1) }}", "size limit"),
        ("{{ '%1000000000d' % 1 }}", "size limit"),
        ("{{ 'x'|format }}{{ '%*d'|format(10**9, 1) }}", "size limit"),
        ("{{ range(10)|batch(10**9, 'x')|list }}", "size limit"),
        ("{{ (range(100000)|list) * 1000 }}", "size limit"),
        ("{{ range(100000)|join(msg.a * 1000) }}", "size limit"),
        ("{{ (msg.a * 1000)|replace('', msg.a * 100000) }}", "size limit"),
        (
            "{% set ns = namespace(s=msg.a) %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}{{ ns.s|length }}",
            "size limit",
        ),
        (
            "{% set big = msg.a * 1000000 %}{% set x %}{% for i in range(1000) %}{{ big }}"
            "{% endfor %}{% endset %}{{ x|length }}",
            "size limit",
        ),
        (
            "{% macro m(s) %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endmacro %}"
            "{{ m(msg.a * 1000000)|length }}",
            "size limit",
        ),
        ("{{ {'k': [1]}|tojson(indent=10**9) }}", "size limit"),
        ("{{ (msg.a * 1000000).translate(''.maketrans({'a': msg.a * 100000})) }}", "size limit"),
        ("{{ (msg.a * 1000).encode().ljust(10**9)|length }}", "size limit"),
        (
            "{% set ns = namespace(n=msg.n) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
            "{% endfor %}{{ ns.n > 0 }}",
            "size limit",
        ),
    ],
)
def test_a_hostile_template_fails_its_render_with_the_bound_it_hit(
    source: str, reason: str
) -> None:
    """Loops, big strings, widths and growing values are stopped before they are built."""
    started = time.monotonic()
    with pytest.raises(TemplateLimitError, match=f"template exceeded its {reason}"):
        render(source, a="ab", n=3)
    assert time.monotonic() - started < 30  # generous: unbounded, these take hours or GBs


def test_the_time_limit_stops_a_long_render() -> None:
    """``templates.timeout`` ends a render that stays inside its step budget."""
    with (
        using_limits(TemplateLimits(max_steps=10**9, timeout=0.2)),
        pytest.raises(TemplateLimitError, match=r"time limit of 0.2s \(templates.timeout"),
    ):
        render(NESTED)


def test_the_step_budget_stops_a_long_loop() -> None:
    """``templates.max_steps`` counts loop iterations: the render past it fails."""
    source = "{% for i in range(msg.n) %}.{% endfor %}"
    with using_limits(TemplateLimits(max_steps=100, timeout=60)):
        assert render(source, n=99) == "." * 99  # the call of range is a step too
        with pytest.raises(TemplateLimitError, match="step budget of 100 loop iterations"):
            render(source, n=100)


def test_output_past_max_output_is_refused() -> None:
    """What a render prints counts against ``max_output`` as it is produced."""
    source = "{% for i in range(1000) %}{{ msg.a }}{% endfor %}"
    with using_limits(TemplateLimits(max_output=5_000)):
        assert len(render(source, a="abcd")) == 4000
        with pytest.raises(TemplateLimitError, match="its output would be 5,00"):
            render(source, a="abcdef")


def test_a_when_expression_is_bounded_too() -> None:
    """A ``when`` expression that builds a huge value fails instead of running."""
    expr = Expression("(msg.a * 1000000000) == ''")
    with pytest.raises(TemplateLimitError, match="size limit"):
        expr.evaluate(make_context({"msg": {"a": "x"}}))


def test_constant_bombs_fail_at_compile_time_without_being_built() -> None:
    """``{{ 'a' * 10**9 }}`` is refused when compiled (validation), with its line."""
    started = time.monotonic()
    with pytest.raises(TemplateLimitError, match="1,000,000,000 characters") as caught:
        Template("line one\n{{ 'a' * 10**9 }}")
    assert caught.value.lineno == 2
    with pytest.raises(TemplateLimitError):
        Expression("('ab' ~ 'c') * 10**9 == ''")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ msg.n + 1 }}-{{ msg.a ~ 'z' }}-{{ [1, 2]|join(',') }}", "4-abz-1,2"),
        (
            "{{ '%05d' % msg.n }} {{ '{:>4}'.format(msg.n) }} {{ msg.a|center(6) }}",
            "00003    3   ab  ",
        ),
        ("{% for i in range(3) %}{{ i }}{% endfor %}{{ 'ab' * 2 }}{{ 2 ** 10 }}", "012abab1024"),
        ("{{ [[1], [2]]|sum(start=[]) }} {{ range(3)|sum }}", "[1, 2] 3"),
        ("{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m(msg.a) }}", "<ab>"),
    ],
)
def test_ordinary_templates_render_as_before(source: str, expected: str) -> None:
    """The bounds change nothing for templates within them."""
    assert render(source, a="ab", n=3) == expected


def test_lipsum_is_not_offered() -> None:
    """``lipsum(n)`` generates text in a loop of its own: templates cannot use it."""
    with pytest.raises(Exception, match="lipsum"):
        render("{{ lipsum(10**6) }}")
