"""The ``cortex-flow`` command: parses arguments, calls the library, maps errors to exit codes.

``cli(*args)`` is callable from tests and returns the exit code; only ``main`` exits.
Exit codes: 0 success, 1 invalid input or failed operation, 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from cortex_flow.errors import ConnectionFailed, CortexFlowError, UsageError, ValidationFailed
from cortex_flow.version import __version__

# command -> "module:function"; each function takes the parsed args and returns an exit code
COMMANDS = {
    "validate": "cortex_flow.cli.validate:command",
    "schema": "cortex_flow.cli.schema:command",
    "graph": "cortex_flow.cli.graph:command",
    "run": "cortex_flow.cli.run:command",
    "plan": "cortex_flow.cli.plan:command",
    "send": "cortex_flow.cli.send:command",
    "gateway": "cortex_flow.cli.gateway:command",
    "task": "cortex_flow.cli.tasks:show",
    "cancel": "cortex_flow.cli.tasks:cancel_command",
    "status": "cortex_flow.cli.status:command",
    "dlq": "cortex_flow.cli.dlq:command",
    "delayed": "cortex_flow.cli.delayed:command",
    "prune": "cortex_flow.cli.prune:command",
    "test": "cortex_flow.cli.test:command",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cortex-flow", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--version", action="version", version=f"cortex-flow {__version__}")
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        help="runner settings (default ./config.yaml when present, else built-in defaults); "
        "a file named here must exist",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("validate", parents=[common], help="validate flows and config")
    p.add_argument("paths", nargs="*", type=Path, help="flow files or folders (default: flows)")
    p.add_argument("--format", choices=["text", "json", "github"], default="text")
    p.add_argument(
        "--check-imports",
        action="store_true",
        help="import every call target; say where each comes from",
    )

    p = sub.add_parser("schema", parents=[common], help="write or check schemas/*.json")
    p.add_argument("--out", type=Path, default=None, help="folder (default: schemas/ by config)")
    p.add_argument("--check", action="store_true", help="fail when the files are stale")
    p.add_argument(
        "--print", dest="print_", choices=["flow", "config", "flowtest"], help="print one schema"
    )

    p = sub.add_parser("graph", parents=[common], help="the topology as a Mermaid diagram")
    p.add_argument("paths", nargs="*", type=Path)

    p = sub.add_parser("run", parents=[common], help="provision and run the consumers")

    p = sub.add_parser(
        "gateway", parents=[common], help="serve HTTP/WebSocket for agents without Redis"
    )

    p = sub.add_parser("plan", parents=[common], help="what run or a reload would change")
    p.add_argument("paths", nargs="*", type=Path)
    p.add_argument("--format", choices=["text", "json"], default="text")

    # the key of a stream: its name and the flags that pick one of its keys
    key = _Parser(add_help=False)
    key.add_argument("stream", help="stream name from the flows")
    key.add_argument("--priority", help="priority level for a priority stream")
    key.add_argument("--agent", help="agent for a per-agent stream")
    key.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")

    p = sub.add_parser("send", parents=[common, key], help="publish a message (or ask and wait)")
    p.add_argument("json", help='message fields as a JSON object, e.g. \'{"type": "chat"}\'')
    p.add_argument("--ttl", help="a deadline: not handled when read later, e.g. 30s")
    p.add_argument(
        "--wait",
        nargs="?",
        const="30",
        default=None,
        metavar="TIMEOUT",
        help="send as a request and print the reply as JSON (default 30s); exit 1 when it "
        "failed or was canceled, 124 when it timed out",
    )
    p.add_argument("--delay", help="deliver after this long (e.g. 30s, 5m): held in Redis")
    p.add_argument("--at", help="deliver at this time (ISO 8601, e.g. 2026-05-01T09:00:00Z)")
    p.add_argument("--idempotency-key", help="a repeat within the window returns the first ID")

    p = sub.add_parser("task", parents=[common, key], help="the state of a requested message")
    p.add_argument("entry_id", help="the entry ID the message got when sent")
    p.add_argument("--format", choices=["text", "json"], default="text")

    p = sub.add_parser("cancel", parents=[common, key], help="cancel a message")
    p.add_argument("entry_id", help="the entry ID the message got when sent")

    p = sub.add_parser("delayed", parents=[common], help="list or cancel delayed messages")
    dsub = p.add_subparsers(dest="delayed_command", required=True, parser_class=_Parser)
    d = dsub.add_parser("list", parents=[common], help="what waits, earliest first")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("cancel", parents=[common], help="drop delayed messages before due")
    d.add_argument("ids", nargs="+", help="delayed message IDs (as send or list print them)")

    p = sub.add_parser("status", parents=[common], help="streams, groups, agents at a glance")
    p.add_argument("--watch", action="store_true")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("dlq", parents=[common], help="inspect and replay the dead-letter stream")
    dsub = p.add_subparsers(dest="dlq_command", required=True, parser_class=_Parser)
    for name in ("list", "show", "replay", "purge"):
        d = dsub.add_parser(name, parents=[common])
        if name == "show":
            d.add_argument("id")
        else:
            d.add_argument("ids", nargs="*", help="entry IDs (default: all matching)")
            d.add_argument("--stream", dest="source", help="only entries from this source key")
            d.add_argument("--group", help="only entries from this group")
            d.add_argument("--error", help="only entries whose error contains this text")
            d.add_argument("--older-than", help="only entries older than a duration (e.g. 1h)")
            d.add_argument("--newer-than", help="only entries newer than a duration")
            d.add_argument("--limit", type=int, default=None)
        if name in ("replay", "purge"):
            d.add_argument("--dry-run", action="store_true")
        if name == "purge":
            d.add_argument(
                "--yes", action="store_true", help="purge without asking (needed without a TTY)"
            )
        if name == "replay":
            d.add_argument(
                "--yes",
                action="store_true",
                help="replay to a source key that several groups read (each gets it again)",
            )
        if name in ("list", "show"):
            d.add_argument("--json", action="store_true")
        d.add_argument("--dlq", help="dead-letter stream name or key (default: all declared)")

    p = sub.add_parser(
        "prune", parents=[common], help="destroy a consumer group no flow declares (stale)"
    )
    p.add_argument("group", help="the stale group's name (as status or plan list it)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    p = sub.add_parser("test", parents=[common], help="run flow tests (*.test.yaml)")
    p.add_argument("paths", nargs="*", type=Path)
    p.add_argument("--format", choices=["text", "github"], default="text")
    p.add_argument("--url", help="test Redis to use instead of a private one (keys are deleted)")
    p.add_argument("-k", dest="keyword", help="only cases whose name contains this text")
    return parser


def cli(*args: str) -> int:
    """Run one command; returns its exit code instead of exiting."""
    try:
        parsed = build_parser().parse_args(list(args))
        module_name, _, func = COMMANDS[parsed.command].partition(":")
        handler = getattr(importlib.import_module(module_name), func)
        code: int = handler(parsed)
        return code
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except ValidationFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    except ConnectionFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CortexFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(cli(*(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
