"""``${VAR}`` interpolation in raw YAML text."""

from __future__ import annotations

import pytest

from cortex_flow.errors import Problem, ValidationFailed
from cortex_flow.flow.envvars import interpolate

HINT = "write ${NAME} or ${NAME:-default} (NAME: letters, digits, _), or $${ for a literal ${"


def run(text: str, **env: str) -> str:
    return interpolate(text, env, file="flows/a.yaml")


def problems(text: str, **env: str) -> list[Problem]:
    with pytest.raises(ValidationFailed) as failed:
        run(text, **env)
    return failed.value.problems


def test_reference_is_replaced_by_the_variable() -> None:
    """${VAR} is replaced by the variable's value, wherever it sits in a scalar."""
    assert run("url: redis://${HOST}:6379/0\n", HOST="db") == "url: redis://db:6379/0\n"


def test_default_is_used_when_the_variable_is_unset() -> None:
    """${VAR:-default} gives the default when VAR is not set."""
    assert run("url: ${URL:-embedded}") == "url: embedded"


def test_default_is_used_when_the_variable_is_empty() -> None:
    """${VAR:-default} gives the default when VAR is set but empty, as in a shell."""
    assert run("name: ${HOSTNAME:-cortex}", HOSTNAME="") == "name: cortex"


def test_a_set_variable_wins_over_the_default() -> None:
    """${VAR:-default} gives VAR's value when it is set and not empty."""
    assert run("name: ${HOSTNAME:-cortex}", HOSTNAME="box1") == "name: box1"


def test_the_default_may_be_empty() -> None:
    """${VAR:-} gives an empty string when VAR is unset."""
    assert run('password: "${PASSWORD:-}"') == 'password: ""'


def test_an_empty_variable_without_default_is_not_missing() -> None:
    """${VAR} with VAR set to the empty string is replaced by nothing, not reported."""
    assert run("a: x${EMPTY}y", EMPTY="") == "a: xy"


def test_double_dollar_escapes_a_literal_reference() -> None:
    """$${ is written out as a literal ${, and what follows is not interpolated."""
    assert run("a: $${HOME} and $${NOPE:-x}") == "a: ${HOME} and ${NOPE:-x}"


def test_jinja_templates_are_left_alone() -> None:
    """{{ }} and {% %} templates, and ${{ (a $ before a template), are not touched."""
    text = 'key: "cortex:{{ agent }}:${P}"\nwhen: "{% if x %}${{ msg.price }}{% endif %}"\n'
    assert run(text, P="1") == text.replace("${P}", "1")


def test_references_inside_a_jinja_template_are_not_interpolated() -> None:
    """A ${...} inside {{ }} is template text, not an environment reference."""
    assert run('a: "{{ "${NOT_SET}" }}"') == 'a: "{{ "${NOT_SET}" }}"'


def test_comments_are_not_interpolated() -> None:
    """References after a comment's # are neither replaced nor reported."""
    text = "# set ${TOKEN} first\nurl: ${URL}  # or ${OTHER}\n\t# ${TAB}\n"
    assert run(text, URL="u") == "# set ${TOKEN} first\nurl: u  # or ${OTHER}\n\t# ${TAB}\n"


def test_a_hash_inside_quotes_does_not_start_a_comment() -> None:
    """A # inside a quoted scalar is text, so references after it are interpolated."""
    assert run("a: \"x #${A}\"\nb: 'it''s #${A}'", A="1") == "a: \"x #1\"\nb: 'it''s #1'"


def test_a_hash_inside_a_word_does_not_start_a_comment() -> None:
    """A # not preceded by a space (``a#b``) is part of a plain scalar."""
    assert run("url: redis://h/0#${A}", A="1") == "url: redis://h/0#1"


def test_an_apostrophe_inside_a_word_does_not_open_a_quote() -> None:
    """``it's`` does not start a quoted scalar, so a later comment is still a comment."""
    assert run("a: it's ${A} # ${B}", A="1") == "a: it's 1 # ${B}"


def test_a_dollar_without_brace_is_text() -> None:
    """$VAR and a lone $ are not references."""
    assert run("a: $HOME costs $5 ${A}$", A="x") == "a: $HOME costs $5 x$"


def test_text_without_dollar_is_returned_unchanged() -> None:
    """Text without any $ is returned as the very same object (the fast path)."""
    text = "version: 1\n"
    assert run(text) is text


def test_values_are_inserted_as_text() -> None:
    """A value is inserted verbatim, YAML syntax included (documented, not escaped)."""
    assert run("a: ${V}", V="x: 'y'") == "a: x: 'y'"


def test_all_missing_variables_are_reported_together() -> None:
    """Every unset variable without a default is reported at once, each at its line:col."""
    text = "redis:\n  url: ${CORTEX_REDIS_URL}\n  password: ${CORTEX_TOKEN} ${CORTEX_TOKEN}\n"
    expected = [
        (2, 8, "CORTEX_REDIS_URL"),
        (3, 13, "CORTEX_TOKEN"),
        (3, 29, "CORTEX_TOKEN"),
    ]
    assert problems(text) == [
        Problem(
            "flows/a.yaml",
            line,
            col,
            "",
            f"environment variable {name} is not set; "
            f"set it or give a default with ${{{name}:-value}}",
        )
        for line, col, name in expected
    ]


def test_columns_count_characters_not_bytes() -> None:
    """The column of a reference after non-ASCII text counts characters."""
    assert [(p.line, p.col) for p in problems("é: ${X}")] == [(1, 4)]


@pytest.mark.parametrize(
    ("reference", "col"),
    [("${1X}", 4), ("${A-b}", 4), ("${}", 4), ("${A B}", 4), ("${A:-${B:-x}}", 4)],
)
def test_malformed_references_are_problems(reference: str, col: int) -> None:
    """A ${ not followed by a valid name and } (or :-default}) is reported with the syntax."""
    shown = reference if reference.count("}") < 2 else reference[: reference.index("}") + 1]
    assert problems(f"a: {reference}") == [
        Problem("flows/a.yaml", 1, col, "", f'malformed variable reference "{shown}"; {HINT}')
    ]


def test_an_unterminated_reference_is_a_problem() -> None:
    """A ${ without a closing } on its line is reported as unterminated."""
    assert problems("a: 1\nb: ${URL\n") == [
        Problem(
            "flows/a.yaml",
            2,
            4,
            "",
            f'unterminated variable reference "${{URL": no closing }}; {HINT}',
        )
    ]


def test_malformed_and_missing_are_reported_together() -> None:
    """Malformed references and missing variables end up in one error."""
    found = problems("a: ${1X}\nb: ${MISSING}\n")
    assert [(p.line, p.col) for p in found] == [(1, 4), (2, 4)]


def test_hostname_not_in_the_environment_is_the_machines_host_name() -> None:
    """bash and systemd do not export HOSTNAME: without it, ${HOSTNAME} is the host name."""
    import socket

    assert run("name: ${HOSTNAME:-cortex}") == f"name: {socket.gethostname()}"
    assert run("name: ${HOSTNAME}") == f"name: {socket.gethostname()}"
    assert run("name: ${HOSTNAME:-cortex}", HOSTNAME="box1") == "name: box1"
