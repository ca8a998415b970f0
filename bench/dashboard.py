"""The dashboard's page weight and time to first render, with many agents and groups.

    .venv/bin/python bench/dashboard.py [--agents 1000] [--groups 100] [--shot docs/dashboard.png]

Starts a private redis-server and `cortex-flow run` with ``--agents`` agents (nine in ten
beating, the rest down) and ``--groups`` groups, each on a stream of its own with a dead-letter
stream, fills them a little, then loads ``/ui`` in headless chromium (Debian's, through
Selenium with the system chromedriver) and reads the browser's own timings: bytes
transferred for the page and its assets, first contentful paint, and how long the server
took to answer. ``--shot`` saves a screenshot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import Server, free_port  # noqa: E402
from cortex_flow.wire.heartbeats import beat_fields  # noqa: E402


def project(folder: Path, url: str, agents: int, groups: int, port: int) -> Path:
    streams = [f"  s{g:03d}: {{key: 'bench:s{g:03d}'}}" for g in range(groups)]
    lines = ["version: 1", "streams:", *streams, "  dlq: {key: 'bench:dlq'}"]
    lines += ["  beats: {key: 'bench:beats'}", "heartbeats: {stream: beats}", "agents:"]
    lines += [f"  agent{a:04d}: {{heartbeat: {{interval: 5s}}}}" for a in range(agents)]
    lines.append("groups:")
    for g in range(groups):
        to = f"s{g + 1:03d}" if g + 1 < groups else None
        route = f"{{to: {to}}}" if to else "{drop: true}"
        lines += [f"  g{g:03d}:", f"    stream: s{g:03d}", "    dead_letter: dlq"]
        lines.append(f"    routes: [{route}]")
    (folder / "flows").mkdir()
    (folder / "flows" / "main.yaml").write_text("\n".join(lines) + "\n")
    config = folder / "config.yaml"
    config.write_text(
        f"redis: {{url: '{url}'}}\nflows: flows/\nrunner: {{name: bench-ui}}\n"
        f"reload: {{watch: false}}\nadmin: {{listen: '127.0.0.1:{port}'}}\n"
        "log: {level: warning}\n"
    )
    return config


def fill(server: Server, agents: int, groups: int) -> None:
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for a in range(agents):
        if a % 10:  # one in ten never beats: shown down
            pipe.xadd("bench:beats", beat_fields(f"agent{a:04d}"))
    for g in range(groups):
        for n in range(20):
            pipe.xadd(f"bench:s{g:03d}", {"n": str(n)})
    for n in range(30):
        pipe.xadd("bench:dlq", {"n": str(n), "dlq_stream": "bench:s000", "dlq_error": "boom"})
    pipe.execute()
    client.close()


def wait_for_page(url: str, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while True:
        try:
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=10) as response:
                response.read()
            return time.perf_counter() - started
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def measure(url: str, shot: Path | None) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1300,1700")
    service = Service(executable_path=shutil.which("chromedriver") or "chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.get(url)
        timings = driver.execute_script(
            """
            const nav = performance.getEntriesByType("navigation")[0];
            const paint = performance.getEntriesByName("first-contentful-paint")[0];
            const assets = performance.getEntriesByType("resource")
              .filter(r => !r.name.includes("/ui/events"));
            return {
              html_bytes: nav.transferSize, html_decoded: nav.decodedBodySize,
              asset_bytes: assets.reduce((n, r) => n + r.transferSize, 0),
              ttfb_ms: nav.responseStart - nav.requestStart,
              first_paint_ms: paint ? paint.startTime : null,
              dom_ready_ms: nav.domContentLoadedEventEnd,
              loaded_ms: nav.loadEventEnd,
            };
            """
        )
        if shot is not None:
            time.sleep(2.5)  # one SSE push, so the sparklines have points
            driver.save_screenshot(str(shot))
        return dict(timings)
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--groups", type=int, default=100)
    p.add_argument("--shot", type=Path, help="save a screenshot of the page here")
    args = p.parse_args(argv)
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        print("no chromium: apt-get install -y chromium chromium-driver", file=sys.stderr)
        return 2
    server = Server().start()
    folder = Path(tempfile.mkdtemp(prefix="cortex-bench-ui-"))
    port = free_port()
    config = project(folder, server.url, args.agents, args.groups, port)
    fill(server, args.agents, args.groups)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (folder / "run.log").open("w") as log:
        runner = subprocess.Popen(
            [sys.executable, "-m", "cortex_flow", "run", "--config", str(config)],
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        url = f"http://127.0.0.1:{port}/ui"
        wait_for_page(url)
        server_ms = min(wait_for_page(url) for _ in range(5)) * 1000
        figures = measure(url, args.shot)
        figures["server_render_ms"] = round(server_ms, 1)
        print(json.dumps({"agents": args.agents, "groups": args.groups, **figures}, indent=2))
    finally:
        runner.terminate()
        runner.wait(15)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
