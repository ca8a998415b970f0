"""Run the runtime benchmarks against a private redis-server and print a table of figures.

    .venv/bin/python bench/run.py [--quick] [--only consume,route,latency,requests,memory]
                                  [--repeat N] [--profile NAME] [--json PATH]

Each figure comes with a baseline measured in the same run, on the same server, and
the ratio between them. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import (  # noqa: E402
    calls,
    consume,
    flowcontrol,
    gateway,
    idle,
    latency,
    memory,
    requests,
    route,
    steady,
    tracing,
)
from bench.common import Figure, Server  # noqa: E402

BENCHES = (
    "consume",
    "route",
    "calls",
    "steady",
    "latency",
    "requests",
    "memory",
    "idle",
    "tracing",
    "gateway",
    "flowcontrol",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized numbers (well under a minute)")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmarks")
    p.add_argument("--repeat", type=int, help="runs per throughput figure, best kept")
    p.add_argument("--consume-messages", type=int, help="default 200,000 (quick 50,000)")
    p.add_argument("--route-messages", type=int, help="default 100,000 (quick 20,000)")
    p.add_argument("--call-messages", type=int, help="default 50,000 (quick 20,000)")
    p.add_argument("--io-messages", type=int, help="default 12,000 (quick 6,000)")
    p.add_argument("--steady-messages", type=int, help="default 5,000 (quick 2,000)")
    p.add_argument("--latency-backlog", type=int, default=100_000, help="default 100,000")
    p.add_argument("--latency-samples", type=int, help="default 400 (quick 200)")
    p.add_argument("--requests", type=int, help="default 5,000 (quick 2,000)")
    p.add_argument("--memory-first", type=int, help="default 100,000 (quick 50,000)")
    p.add_argument("--memory-last", type=int, help="default 1,000,000 (quick 300,000)")
    p.add_argument("--idle-seconds", type=int, help="default 20 (quick 6)")
    p.add_argument(
        "--profile", choices=("consume", "route", "latency"), help="cProfile cortex-flow's runs"
    )
    p.add_argument("--gateway-requests", type=int, help="default 20,000 (quick 5,000)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    quick = args.quick

    def default(name: str, full: int, small: int) -> None:
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)

    default("repeat", 2, 1)
    default("consume_messages", 200_000, 50_000)
    default("route_messages", 100_000, 20_000)
    default("call_messages", 50_000, 20_000)
    default("io_messages", 12_000, 6_000)
    default("steady_messages", 5_000, 2_000)
    default("latency_samples", 400, 200)
    default("requests", 5_000, 2_000)
    default("memory_first", 100_000, 50_000)
    default("memory_last", 1_000_000, 300_000)
    default("idle_seconds", 20, 6)
    default("gateway_requests", 20_000, 5_000)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(args.only) - set(BENCHES)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return args


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def table(figures: list[Figure]) -> str:
    head = ("benchmark", "figure", "cortex-flow", "baseline", "base value", "ratio", "target")
    rows = [(*head, "met")]
    for f in figures:
        met = "-" if f.met is None else ("yes" if f.met else "NO")
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}"
        rows.append(
            (
                f.bench,
                f.metric,
                number(f.value),
                f.baseline_name,
                number(f.baseline),
                ratio,
                f.target,
                met,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    numeric = {2, 4, 5}
    lines = []
    for n, r in enumerate(rows):
        cells = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {f.bench}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = Server().start()
    profile = cProfile.Profile() if args.profile else None
    figures: list[Figure] = []
    began = time.perf_counter()
    load_before = load()
    print(f"redis-server {server.version} ({server.binary}) on 127.0.0.1:{server.port}")
    print(f"machine: {machine()}", flush=True)
    try:
        for name in args.only:
            t0 = time.perf_counter()
            mine = profile if args.profile == name else None
            if name == "consume":
                got = consume.run(server, args.consume_messages, args.repeat, mine)
            elif name == "route":
                got = route.run(server, args.route_messages, args.repeat, mine)
            elif name == "calls":
                got = calls.run(server, args.call_messages, args.io_messages, args.repeat)
            elif name == "steady":
                got = steady.run(server, args.steady_messages, args.repeat)
            elif name == "tracing":
                got = tracing.run(server, args.route_messages, args.repeat)
            elif name == "flowcontrol":
                seconds = 10.0 if args.quick else 30.0
                got = flowcontrol.run(server, args.route_messages, args.repeat, seconds)
            elif name == "latency":
                got = latency.run(server, args.latency_backlog, args.latency_samples, mine)
            elif name == "requests":
                got = requests.run(server, args.requests)
            elif name == "idle":
                got = idle.run(server, args.idle_seconds)
            elif name == "gateway":
                got = gateway.run(server, args.gateway_requests, args.gateway_requests)
            else:
                got = memory.run(server, args.memory_first, args.memory_last)
            figures.extend(got)
            print(f"  {name}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    finally:
        server.stop()
    print()
    print(table(figures))
    print(
        f"\ntotal {time.perf_counter() - began:.0f}s; load average before {load_before}, "
        f"after {load()}"
    )
    if profile is not None:
        print(f"\ncProfile of cortex-flow in {args.profile} (by own time):")
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=2) + "\n")
    return 0 if all(f.met is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
