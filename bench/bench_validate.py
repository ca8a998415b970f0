"""Benchmark: wall time of ``cortex-flow validate`` on 1,000 flow files and on the repo's flows.

Each run is a fresh subprocess, so the figures include interpreter start and imports,
as a CI job or an editor hook would see them. Targets: 1,000 files in 3 s, the
repository's own flows in 0.5 s.

    python bench/bench_validate.py [--files 1000] [--runs 5] [--keep DIR] [--profile]

``--profile`` also prints the top of a cProfile of one in-process run on the
generated files, to show where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_MANY = 3.0
TARGET_REPO = 0.5

SHARED = """\
# yaml-language-server: $schema=../schemas/flow.schema.json
# Streams every team uses: one inbox per declared agent, and the shared dead-letter queue.
version: 1

streams:
  inbox:
    key: "bench:messages:{{ agent }}"
    maxlen: 10000
    description: Direct messages to one agent.
  dlq:
    key: bench:dlq
    description: Messages that failed too often or could not be decoded.
  heartbeats:
    key: bench:heartbeats
    maxlen: 10000
  events:
    key: bench:events

heartbeats:
  stream: heartbeats
  on_down: {to: events}
"""

TEAM = """\
# yaml-language-server: $schema=../schemas/flow.schema.json
# Team {n}: its task streams, its agents and the group that routes its work.
version: 1

streams:
  t{n}_tasks:
    key: "bench:t{n}:tasks:{{{{ priority }}}}"
    priorities: [critical, high, normal, low]
    maxlen: 100000
    description: Work for team {n}, by priority.
  t{n}_results:
    key: bench:t{n}:results
    codec: json
    maxlen: 50000
  t{n}_audit:
    key: bench:t{n}:audit

agents:
  t{n}_lead:
    heartbeat: {{interval: 30s}}
    description: Coordinates team {n}.
  t{n}_worker:
    heartbeat: {{interval: 10s, timeout: 25s}}

groups:
  t{n}_router:
    stream: t{n}_tasks
    start: earliest
    concurrency: 8
    batch: 50
    priority: weighted
    weights: {{critical: 8, high: 4, normal: 2, low: 1}}
    retry: {{max_deliveries: 5, backoff: {{initial: 500ms, max: 30s}}, claim_idle: 5m}}
    dead_letter: dlq
    routes:
      - name: direct
        when: "msg.to in agents and msg.get('kind', 'task') != 'audit'"
        to: inbox
        vars: {{agent: "{{{{ msg.to }}}}"}}
      - name: batch
        when: "msg.type == 'batch' and deliveries < 3"
        call: {{function: "team{n}.jobs:run_batch", timeout: 2m}}
      - name: bridge
        http: {{url: "http://127.0.0.1:9000/a2a/{n}", timeout: 5s}}
"""


def generate(folder: Path, count: int) -> Path:
    """Write ``count`` team files plus the shared one under ``folder``; return config.yaml."""
    flows = folder / "flows"
    flows.mkdir(parents=True, exist_ok=True)
    (flows / "00-shared.yaml").write_text(SHARED, encoding="utf-8")
    for n in range(1, count):
        (flows / f"team-{n:04d}.yaml").write_text(TEAM.format(n=n), encoding="utf-8")
    config = folder / "config.yaml"
    config.write_text("redis: {url: embedded}\nflows: flows/\n", encoding="utf-8")
    return config


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wall_time(config: Path, runs: int) -> tuple[float, float, float]:
    """Median and best wall time, and median CPU time, of ``cortex-flow validate``.

    CPU time (user + system of the child) is steadier than wall time on a busy machine.
    """
    command = [sys.executable, "-m", "cortex_flow", "validate", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "CORTEX_REDIS_URL"}
    walls, cpus = [], []
    for _ in range(runs):
        cpu = _cpu()
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu() - cpu)
        if done.returncode != 0:
            raise SystemExit(f"validate failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return statistics.median(walls), min(walls), statistics.median(cpus)


def profile(config: Path) -> str:
    from cortex_flow.cli import cli

    profiler = cProfile.Profile()
    out = io.StringIO()
    stdout, sys.stdout = sys.stdout, io.StringIO()
    try:
        profiler.runcall(cli, "validate", "--config", str(config))
    finally:
        sys.stdout = stdout
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cortex-bench-") as tmp:
        folder = args.keep or Path(tmp)
        config = generate(folder, args.files)
        lines = sum(p.read_text().count("\n") for p in (folder / "flows").iterdir())
        load = os.getloadavg()[0]
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {load:.2f}, "
            f"{args.runs} runs each"
        )
        for what, target, cfg in (
            (f"{args.files} flow files ({lines} lines)", TARGET_MANY, config),
            ("repo flows", TARGET_REPO, REPO / "config.yaml"),
        ):
            median, best, cpu = wall_time(cfg, args.runs)
            print(
                f"{what}: wall median {median:.3f} s, best {best:.3f} s, cpu {cpu:.3f} s"
                f"  -> median is {median / target:.2f} x the {target:g} s target"
            )
        if args.profile:
            print(profile(config))


if __name__ == "__main__":
    main()
