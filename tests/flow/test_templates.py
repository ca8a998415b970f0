"""Templates and expressions: the sandbox, strict undefined names, and the plain-text paths."""

from __future__ import annotations

import pytest
from jinja2 import TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context

from cortex_flow.flow.templates import (
    Expression,
    Template,
    compile_expression,
    compile_template,
    make_context,
)

MSG = {"to": "harold", "type": "batch", "n": "3"}


def ctx(**values: object) -> Context:
    return make_context({"msg": dict(MSG), "agents": {"harold", "planner"}, **values})


# --- rendering ------------------------------------------------------------------------


def test_literal_template_renders_its_source() -> None:
    """Text without {{ }} is returned as is and has no variables."""
    template = Template("cortex:tasks:dlq")
    assert template.is_literal
    assert template.variables == frozenset()
    assert template.render(ctx()) == "cortex:tasks:dlq"


def test_placeholder_template_renders_names_and_attributes() -> None:
    """{{ name }} and {{ msg.field }} render from the context."""
    template = Template("cortex:{{ priority }}:{{ msg.to }}")
    assert not template.is_literal
    assert template.variables == {"priority", "msg"}
    assert template.render(ctx(priority="high")) == "cortex:high:harold"


def test_non_string_values_render_like_jinja() -> None:
    """A number or None in a placeholder renders as jinja2 would."""
    assert Template("n={{ n }}").render(ctx(n=3)) == "n=3"
    assert Template("{{ v }}").render(ctx(v=None)) == "None"


def test_filters_and_statements_render() -> None:
    """Full jinja2 syntax works: filters, conditions, loops."""
    template = Template("{{ msg.to | upper }}{% if msg.n == '3' %}!{% endif %}")
    assert template.render(ctx()) == "HAROLD!"
    loop = Template("{% for a in agents | sort %}{{ a }},{% endfor %}")
    assert loop.render(ctx()) == "harold,planner,"


@pytest.mark.parametrize(
    "source",
    [
        "a:{{ x }}",
        "{{x}}{{ y.z }}",
        "{{ none }}",
        "{{ true }}",
        "{{ x }}\n",
        "a{{ x.y.z }}b{{w}}",
        "{ x }} {{ y }}",
        "{{ x }} {% if y %}{% endif %}",
    ],
)
def test_placeholder_names_match_jinja(source: str) -> None:
    """The names found without jinja2 are the names jinja2 itself finds."""
    from jinja2 import meta

    from cortex_flow.flow.templates import environment

    expected = meta.find_undeclared_variables(environment().parse(source))
    assert Template(source).variables == expected


def test_rendering_matches_jinja_for_placeholders() -> None:
    """A placeholder template renders exactly as jinja2 renders it."""
    from cortex_flow.flow.templates import environment

    values = {"x": "1", "y": {"z": "2"}, "w": 5}
    for source in ["a:{{ x }}:b", "{{x}}{{ y.z }}", "{{ w }}-{{ x }}", "{{ x }}\n"]:
        expected = environment().from_string(source).render(values)
        assert Template(source).render(make_context(values)) == expected, source


# --- sandbox and undefined names ------------------------------------------------------


def test_sandbox_refuses_dunder_attributes_in_templates() -> None:
    """Templates cannot reach __class__ (and so not __mro__ or __subclasses__)."""
    template = Template("{{ msg.__class__.__mro__ }}")
    with pytest.raises(SecurityError):
        template.render(ctx())


def test_sandbox_refuses_mro_in_expressions() -> None:
    """Expressions cannot reach __class__ either: using the result raises SecurityError."""
    result = Expression("msg.__class__.mro()")
    with pytest.raises(SecurityError):
        bool(result.evaluate(ctx()))


def test_sandbox_refuses_function_internals() -> None:
    """Methods' internals (__self__, __globals__) are out of reach."""
    with pytest.raises(SecurityError):
        Template("{{ msg.items.__self__ }}").render(ctx())


def test_sandbox_is_immutable() -> None:
    """Templates cannot modify the message."""
    with pytest.raises(SecurityError):
        Template("{{ msg.update({'to': 'x'}) }}").render(ctx())


def test_undefined_name_raises_in_templates() -> None:
    """An undefined name is an error, never an empty string."""
    with pytest.raises(UndefinedError):
        Template("{{ nope }}").render(ctx())
    with pytest.raises(UndefinedError):
        Template("a:{{ msg.missing }}").render(ctx())


def test_missing_field_in_an_expression_is_falsy() -> None:
    """In a `when`, a field the message lacks is undefined and falsy: no match, no error."""
    assert Expression("msg.missing == 'x'").evaluate(ctx()) is False
    assert Expression("msg.missing in agents").evaluate(ctx()) is False
    assert Expression("msg.missing.deeper == 1").evaluate(ctx()) is False
    assert Expression("not msg.missing").evaluate(ctx()) is True


def test_missing_field_in_a_template_raises() -> None:
    """In a template (vars, set, keys), a missing field is an error, never an empty string."""
    with pytest.raises(UndefinedError):
        compile_template("{{ msg.missing }}").render(make_context({"msg": {}}))


# --- expressions ----------------------------------------------------------------------


def test_expression_evaluates_to_python_values() -> None:
    """An expression returns a value, not text."""
    assert Expression("msg.to in agents").evaluate(ctx()) is True
    assert Expression("msg.type == 'other'").evaluate(ctx()) is False
    assert Expression("msg.n | int + 1").evaluate(ctx()) == 4


def test_expression_strips_braces() -> None:
    """`{{ expr }}` is taken as `expr`, so both spellings work."""
    plain = Expression("msg.type == 'batch'")
    braced = Expression("{{ msg.type == 'batch' }}")
    assert braced.variables == plain.variables == {"msg"}
    assert braced.evaluate(ctx()) is True
    assert braced.source == "{{ msg.type == 'batch' }}"


def test_expression_variables() -> None:
    """The names an expression uses are known before it runs."""
    assert Expression("msg.to in agents and deliveries < 3").variables == {
        "msg",
        "agents",
        "deliveries",
    }


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("msg.to ==", "unexpected 'end of expression'"),
        ("msg.to msg", "unexpected 'msg' after the end of the expression"),
        ("(msg.to", "unexpected end of expression, expected ')'."),
    ],
)
def test_expression_syntax_errors(source: str, message: str) -> None:
    """Syntax errors are raised at compile time, worded for an expression."""
    with pytest.raises(TemplateSyntaxError) as caught:
        compile_expression(source)
    assert caught.value.message == message
    assert caught.value.lineno == 1


def test_unknown_filter_fails_at_compile_time_even_under_a_condition() -> None:
    """An unknown filter is a compile error, even where jinja2 would defer it."""
    with pytest.raises(TemplateSyntaxError, match="shout"):
        compile_expression("msg.to | shout if msg.to else ''")
    with pytest.raises(TemplateSyntaxError, match="shout"):
        compile_template("{% if msg.to %}{{ msg.to | shout }}{% endif %}")
    with pytest.raises(TemplateSyntaxError, match="odd_ish"):
        compile_expression("msg.n is odd_ish")


def test_template_syntax_error_has_its_line() -> None:
    """A multi-line template's error carries the line inside the template."""
    with pytest.raises(TemplateSyntaxError) as caught:
        compile_template("first {{ msg.a }}\nsecond {{ msg.b c }}")
    assert caught.value.lineno == 2


def test_statement_errors_are_found_at_compile_time() -> None:
    """Errors jinja2 finds only when generating code are still raised at compile time."""
    with pytest.raises(TemplateSyntaxError, match="loop"):
        compile_template("{% for loop in agents %}{% endfor %}")


def test_now_renders_iso_utc() -> None:
    """{{ now }} renders ISO 8601 UTC and now.ts is epoch seconds."""
    from cortex_flow.flow.templates import Now

    now = Now()
    text = Template("{{ now }}").render(make_context({"now": now}))
    assert text.endswith("+00:00") and "T" in text
    assert Expression("now.ts").evaluate(make_context({"now": now})) == now.ts
