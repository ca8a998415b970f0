"""``cortex-flow schema``: write, check or print the JSON Schema files in ``schemas/``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def command(args: argparse.Namespace) -> int:
    from cortex_flow.flow import schema as schemas  # here: validate need not import the test models

    if args.print_:
        name = f"{args.print_}.schema.json"
        print(schemas.render(schemas.SCHEMAS[name]), end="")
        return 0
    out = args.out or Path(args.config or "config.yaml").resolve().parent / "schemas"
    from cortex_flow.gateway import openapi

    gateway_doc = out / openapi.FILE_NAME
    if args.check:
        stale = schemas.stale(out)
        if not gateway_doc.exists() or gateway_doc.read_text(encoding="utf-8") != openapi.render():
            stale.append(openapi.FILE_NAME)
        if stale:
            print(
                f"schemas out of date in {out}: {', '.join(stale)}; run `cortex-flow schema` "
                "to regenerate them",
                file=sys.stderr,
            )
            return 1
        print(f"schemas in {out} are up to date")
        return 0
    for path in schemas.write(out):
        print(f"wrote {path}")
    gateway_doc.write_text(openapi.render(), encoding="utf-8")
    print(f"wrote {gateway_doc}")
    return 0
