"""Print validation problems as text, JSON or GitHub annotations."""

from __future__ import annotations

import json
from collections.abc import Sequence

from cortex_flow.errors import Problem

FORMATS = ("text", "json", "github")


def escape_annotation(text: str, props: bool = False) -> str:
    """GitHub workflow-command escaping; properties also escape ``:`` and ``,``."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if props else text


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def summary(problems: Sequence[Problem], files: Sequence[str]) -> str:
    """``3 problems in 2 of 4 files``: how many problems, in how many of the files read.

    A problem can name a file that was never read (a missing config, flows folder or path):
    it counts among the files, so the total is never below the files with problems. With
    nothing read at all the summary reads ``2 problems in 2 files``.
    """
    bad = {p.file for p in problems}
    total = len(bad | set(files))
    head = _plural(len(problems), "problem")
    if not files:
        return f"{head} in {_plural(len(bad), 'file')}"
    return f"{head} in {len(bad)} of {_plural(total, 'file')}"


def format_problems(problems: Sequence[Problem], fmt: str, files: Sequence[str]) -> str:
    """Every problem in the chosen format; text ends with a summary line when there are any.

    ``files`` are the files read (config and flows), for the summary and the JSON report.
    """
    if fmt == "json":
        return json.dumps(
            {
                "valid": not problems,
                "files": list(files),
                "problems": [
                    {
                        "file": p.file,
                        "line": p.line,
                        "col": p.col,
                        "path": p.path,
                        "message": p.message,
                    }
                    for p in problems
                ],
            },
            indent=2,
        )
    if fmt == "github":
        return "\n".join(
            f"::error file={escape_annotation(p.file, True)},line={p.line},col={p.col},"
            f"title={escape_annotation(p.path or 'cortex-flow', True)}::{escape_annotation(str(p))}"
            for p in problems
        )
    if not problems:
        return ""
    return "\n".join([*(str(p) for p in problems), summary(problems, files)])
