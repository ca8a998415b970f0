"""``cortex-flow test``: run the flow test cases (``*.test.yaml``) and print each result."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from cortex_flow.errors import ValidationFailed
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.report import format_problems
from cortex_flow.flow.testfile import discover, load_cases
from cortex_flow.testing.flowtest import render, run_cases


def command(args: argparse.Namespace) -> int:
    fmt = args.format
    files: list[Path] = []
    try:
        project = load_project(args.config)
        files = discover(project, args.paths)
        cases = load_cases(project, files)
    except ValidationFailed as exc:
        shown = [str(p) for p in files or args.paths] or [str(args.config or "config.yaml")]
        print(format_problems(exc.problems, fmt, shown))
        return 1
    keyword = getattr(args, "keyword", None)
    if keyword:
        cases = [c for c in cases if keyword.lower() in c.case.name.lower()]
    if not cases:
        where = ", ".join(str(p) for p in args.paths) or (
            f"{Path(project.flows_dir).name}/ or tests/flows/"
        )
        print(f"no flow test cases found in {where} (files named *.test.yaml)")
        return 1

    async def go() -> tuple[int, int]:
        passed = failed = 0
        async for result in run_cases(project, cases, getattr(args, "url", None)):
            print(render(result, fmt), flush=True)
            passed += result.passed
            failed += not result.passed
        return passed, failed

    passed, failed = asyncio.run(go())
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1
