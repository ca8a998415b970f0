"""``${VAR}`` interpolation in the raw text of YAML files, with the place of each reference.

Syntax, as in a shell: ``${NAME}`` takes the variable; ``${NAME:-default}`` takes
``default`` when the variable is unset *or empty* (the default may be empty, and ends at
the first ``}``); ``$${`` is a literal ``${``. ``NAME`` is ``[A-Za-z_][A-Za-z0-9_]*``.

Interpolation runs on the raw text before YAML parsing, so that every problem carries
the line and column the user typed. What it leaves alone:

- jinja2 (``{{ ... }}``, ``{% ... %}`` on one line, and ``${{`` which is a literal ``$``
  followed by a template): those belong to the templating layer;
- comments: the rest of a line after a ``#`` that starts the line or follows a space or
  tab, outside quotes. Quotes are tracked per line only, which is enough for the
  one-line scalars of flow files; a ``#`` line inside a block scalar (``|``) counts as a
  comment here.

``HOSTNAME`` is special: shells set it without exporting it, so systemd units, cron jobs
and most ``bash -c`` children do not have it. When it is not in the environment at all,
the machine's host name (``socket.gethostname()``) is used, so ``${HOSTNAME:-cortex}``
gives each machine its own runner name. Set ``HOSTNAME`` (even to the empty string) to
override it.

Values are inserted as text, unescaped: a value holding YAML syntax (``: ``, a quote, a
newline) changes what the YAML parser sees. Secrets such as passwords are safest inside
a plain scalar or a double-quoted one without ``"`` or ``\\`` in the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cortex_flow.errors import Problem, ValidationFailed

__all__ = ["interpolate"]

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-(?:[^}$]|\$(?!\{))*)?\}")
_DOLLAR = re.compile(r"\$\$\{|\$\{\{?")
_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}")
# a quote opens a quoted scalar only where a scalar can start, so `it's` stays plain text
_QUOTE_OPENERS = frozenset(" \t[{,:")
_SYNTAX_HINT = (
    "write ${NAME} or ${NAME:-default} (NAME: letters, digits, _), or $${ for a literal ${"
)


def interpolate(text: str, env: Mapping[str, str], *, file: str) -> str:
    """Return ``text`` with every ``${...}`` reference replaced from ``env``.

    Raises :class:`ValidationFailed` with one problem per unset variable without a default
    and per malformed reference, all of them together, each at its 1-based line:column.
    """
    if "$" not in text:  # the common case costs one scan in C
        return text
    lines = text.split("\n")
    problems: list[Problem] = []
    for index, line in enumerate(lines):
        if "$" in line:
            lines[index] = _interpolate_line(line, index + 1, env, file, problems)
    if problems:
        raise ValidationFailed(problems)
    return "\n".join(lines)


def _interpolate_line(
    line: str, lineno: int, env: Mapping[str, str], file: str, problems: list[Problem]
) -> str:
    end = _comment_start(line)
    templates = [m.span() for m in _JINJA.finditer(line, 0, end)] if "{" in line else []
    out: list[str] = []
    copied = 0  # line[copied:] has not been copied to `out` yet
    for token in _DOLLAR.finditer(line, 0, end):
        start = token.start()
        if start < copied or any(a <= start < b for a, b in templates):
            continue
        if token.group() == "$${":
            out.append(line[copied:start] + "${")
            copied = token.end()
            continue
        if token.group() == "${{":  # a literal $ before a jinja template
            continue
        reference = _REFERENCE.match(line, start)
        if reference is None:
            problems.append(Problem(file, lineno, start + 1, "", _malformed(line, start)))
            continue
        name, default = reference.group(1), reference.group(2)
        value = env.get(name)
        if value is None and name == "HOSTNAME":
            value = _hostname()
        if default is not None and not value:
            value = default[2:]
        if value is None:
            message = (
                f"environment variable {name} is not set; "
                f"set it or give a default with ${{{name}:-value}}"
            )
            problems.append(Problem(file, lineno, start + 1, "", message))
            value = ""
        out.append(line[copied:start] + value)
        copied = reference.end()
    out.append(line[copied:])
    return "".join(out)


def _hostname() -> str:
    """This machine's host name: what an interactive shell's unexported $HOSTNAME holds."""
    import socket  # only when a file uses ${HOSTNAME} and the environment lacks it

    return socket.gethostname()


def _comment_start(line: str) -> int:
    """Index of the ``#`` that starts a comment on ``line``, or its length."""
    if "#" not in line:
        return len(line)
    quote = ""
    i, n = 0, len(line)
    while i < n:
        char = line[i]
        if quote:
            if char == "\\" and quote == '"':
                i += 1  # skip the escaped character
            elif char == quote:
                if quote == "'" and line.startswith("''", i):  # '' is an escaped '
                    i += 1
                else:
                    quote = ""
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return i
        elif char in "\"'" and (i == 0 or line[i - 1] in _QUOTE_OPENERS):
            quote = char
        i += 1
    return n


def _malformed(line: str, start: int) -> str:
    end = line.find("}", start)
    if end < 0:
        shown = line[start : start + 40].rstrip()
        return f'unterminated variable reference "{shown}": no closing }}; {_SYNTAX_HINT}'
    return f'malformed variable reference "{line[start : end + 1]}"; {_SYNTAX_HINT}'
