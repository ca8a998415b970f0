"""Hostile flow files and messages: what ``validate`` and the runner spend on each.

Each case runs ``cortex-flow validate`` or ``cortex-flow run`` as a child under
``/usr/bin/time -v`` and prints its wall time, peak memory (max RSS), exit code and first
line of output; runner cases also count the good messages delivered by id. The runner
cases use a redis-server of their own on a free loopback port (``bench.common.Server``).

    .venv/bin/python -m bench.hostile                      # this checkout
    .venv/bin/python -m bench.hostile --pythonpath DIR     # another checkout's cortex_flow
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench.common import Server

STREAMS = """\
version: 1
streams:
  a: {key: h:a}
  b: {key: h:b}
  out_a: {key: h:out_a}
  out_b: {key: h:out_b}
  dlq: {key: h:dlq}
groups:
  bombed:
    stream: a
    dead_letter: dlq
    routes:
"""
CALM = """\
  calm:
    stream: b
    dead_letter: dlq
    routes:
      - to: out_b
        set: {n: "{{ msg.n }}"}
"""
NESTED = (
    "{% if msg.kind == 'bomb' %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{{ j }}{% endfor %}{% endfor %}{% else %}{{ msg.n }}{% endif %}"
)
ROUTES = {
    "constant bomb {{ 'a' * 10**9 }}": "- to: out_a\n  set: {n: \"{{ 'a' * 10**9 }}\"}\n",
    "nested range(100000) loops": f'- to: out_a\n  set: {{n: "{NESTED}"}}\n',
    "url host from a message": '- http: {url: "http://127.0.0.1:18997{{ msg.path }}"}\n',
    "metadata address": '- http: {url: "http://169.254.169.254/latest/meta-data/"}\n',
    "call subprocess:run": "- call: subprocess:run\n",
}


def timed(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> dict[str, str]:
    """Run ``command`` under /usr/bin/time -v; wall time, max RSS, exit code, first line."""
    done = subprocess.run(
        ["/usr/bin/time", "-v", *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    return parse(done.stderr, done.stdout + done.stderr, done.returncode)


def parse(usage: str, output: str, code: int) -> dict[str, str]:
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", usage)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", usage)
    first = next((line for line in output.splitlines() if line.strip()), "")
    return {
        "wall": wall.group(1) if wall else "?",
        "max_rss_mb": f"{int(rss.group(1)) / 1024:.0f}" if rss else "?",
        "exit": str(code),
        "first line": first[:160],
    }


def write(folder: Path, routes: str, url: str = "redis://127.0.0.1:1/0") -> None:
    (folder / "flows").mkdir(parents=True, exist_ok=True)
    flows = STREAMS + textwrap.indent(routes, "      ") + CALM
    (folder / "flows" / "main.yaml").write_text(flows)
    (folder / "config.yaml").write_text(
        f"redis: {{url: '{url}'}}\nflows: flows/\nrunner: {{name: hostile}}\n"
        "reload: {watch: false}\nadmin: {listen: 'off'}\nlog: {level: warning}\n"
    )


def validate_cases(env: dict[str, str]) -> None:
    for name, routes in ROUTES.items():
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp), routes)
            args = ["--check-imports"] if "call" in name else []
            command = [sys.executable, "-m", "cortex_flow", "validate", *args]
            print(f"validate, {name}: {timed(command, Path(tmp), env, timeout=600)}")


def runner_case(env: dict[str, str], server: Server, deadline: float) -> None:
    """The runner on 1 nested-loop bomb + 40 good messages in its group, 40 in another."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server.flush()
        write(folder, ROUTES["nested range(100000) loops"], server.url)
        log = folder / "run.log"
        with log.open("w") as out:
            began = time.monotonic()
            child = subprocess.Popen(  # its rusage comes from wait4, as /usr/bin/time's does
                [sys.executable, "-m", "cortex_flow", "run"],
                cwd=folder,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        client: Any = server.client()  # replies are str (decode_responses)
        started = time.monotonic() + 30
        while not client.exists("h:a") and time.monotonic() < started:
            time.sleep(0.05)  # the runner's groups exist: what is sent now is read
        client.xadd("h:a", {"kind": "bomb", "n": "x"})
        for n in range(40):
            client.xadd("h:a", {"kind": "good", "n": str(n)})
            client.xadd("h:b", {"kind": "good", "n": str(n)})
        ends = time.monotonic() + deadline
        while time.monotonic() < ends and (
            client.xlen("h:out_a") < 40 or client.xlen("h:out_b") < 40
        ):
            time.sleep(0.05)
        stopped = "stopped on SIGTERM"
        for attempt in range(3):
            os.kill(child.pid, signal.SIGTERM if attempt < 2 else signal.SIGKILL)
            ends = time.monotonic() + 10
            while (
                time.monotonic() < ends
                and os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
            ):
                time.sleep(0.05)
            if time.monotonic() < ends:
                break
            stopped = "ignored SIGTERM twice: killed" if attempt == 1 else stopped
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - began
        delivered = {
            key: sorted({f["n"] for _, f in client.xrange(key)}) for key in ("h:out_a", "h:out_b")
        }
        dead = [str(f.get("dlq_error", ""))[:100] for _, f in client.xrange("h:dlq")]
        good = {k: len([n for n in v if n != "x"]) for k, v in delivered.items()}
        rss = usage.ru_maxrss / 1024
        cpu = usage.ru_utime + usage.ru_stime
        print(
            f"run, nested loops: {wall:.1f}s wall (start to exit), {cpu:.1f}s CPU, "
            f"{rss:.0f} MB max RSS, exit {child.returncode}, {stopped}"
        )
        print(f"  good delivered by id: {good} of 40 each; dead letters: {dead}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pythonpath", help="import cortex_flow from this folder")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds to wait for delivery")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    validate_cases(env)
    server = Server().start()
    try:
        runner_case(env, server, args.deadline)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
