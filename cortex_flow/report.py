"""Print validation problems as text, JSON or GitHub annotations."""

from __future__ import annotations

import json
from collections.abc import Sequence

from cortex_flow.errors import Problem


def _escape(text: str, props: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if props else text


def format_problems(problems: Sequence[Problem], fmt: str, files: Sequence[str]) -> str:
    """Every problem in the chosen format; with no problems, a one-line summary."""
    if fmt == "json":
        return json.dumps(
            {
                "valid": not problems,
                "files": list(files),
                "problems": [
                    {"file": p.file, "line": p.line, "col": p.col, "path": p.path,
                     "message": p.message}
                    for p in problems
                ],
            },
            indent=2,
        )
    if fmt == "github":
        return "\n".join(
            f"::error file={_escape(p.file, True)},line={p.line},col={p.col},"
            f"title={_escape(p.path or 'cortex-flow', True)}::{_escape(str(p))}"
            for p in problems
        )
    lines = [str(p) for p in problems]
    count = len(problems)
    if count:
        lines.append(f"{count} problem{'s' if count != 1 else ''} in {len(files)} file(s)")
    return "\n".join(lines)
