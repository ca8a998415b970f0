"""The dashboard in a real browser: Debian's chromium, headless, driven by Selenium.

`cortex-flow run` serves ``/ui``; the page must show counts change after a `cortex-flow
send` (over server-sent events, without a reload) and replay a dead letter so that it
leaves the list. Selenium is pointed at the system chromium and chromedriver, so it never
downloads a browser; without them the test skips and says how to install them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from projects import end, spawn_runner, wait_for_sync, write_module, write_project
from redis_servers import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver installed: apt-get install -y chromium chromium-driver",
)

FLOWS = """
    version: 1
    streams:
      tasks: {key: "{P}tasks"}
      done: {key: "{P}done"}
      dlq: {key: "{P}dlq"}
    agents: {planner: {}}
    groups:
      router:
        stream: tasks
        dead_letter: dlq
        retry: {max_deliveries: 1}
        routes:
          - when: "msg.kind == 'bad'"
            call: {M}:fail
          - to: done
      sink:
        stream: done
        routes: [{drop: true}]
"""

HANDLERS = """
    def fail(msg):
        if not msg.get("dlq_replays"):  # fails once; its replay goes through
            raise RuntimeError("bad task")
"""


@pytest.fixture
def dashboard(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[tuple[str, Path]]:
    """A `cortex-flow run` child with its admin endpoint on a free loopback port."""
    mod = write_module(tmp_path, HANDLERS)
    port = free_port()
    config = write_project(
        tmp_path,
        FLOWS,
        prefix=prefix,
        mod=mod,
        config=(
            f"redis: {{url: '{redis_url}'}}\nflows: flows/\nrunner: {{name: ui1}}\n"
            f"reload: {{watch: false}}\nadmin: {{listen: '127.0.0.1:{port}'}}\n"
        ),
    )
    runner = spawn_runner(config, tmp_path / "run.log")
    url = f"http://127.0.0.1:{port}/ui"
    try:
        wait_for_sync(lambda: _status(url) == 200, timeout=30, what="the dashboard to answer")
        yield url, config
    finally:
        end(runner)


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except OSError:
        return None


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1300,1600")
    # an explicit driver path: selenium-manager (which downloads browsers) is never asked
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _send(config: Path, fields: dict[str, str]) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cortex_flow",
            "send",
            "--config",
            str(config),
            "tasks",
            json.dumps(fields),
        ],
        check=True,
        capture_output=True,
        cwd=config.parent,
    )


def _count(driver: Any, name: str) -> int:
    """A count at the top of the page, read in one script (SSE swaps the elements)."""
    text = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
        f'[data-count="{name}"]',
    )
    return int(text) if text and text.isdigit() else -1


def _dead_ids(driver: Any) -> list[str]:
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('tr[data-dlq-id]'),"
            " row => row.dataset.dlqId);"
        )
    )


def _click(driver: Any, selector: str) -> bool:
    """Click what ``selector`` finds; False when an SSE update replaced it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        driver.find_element("css selector", selector).click()
    except StaleElementReferenceException:
        return False
    return True


def test_the_page_follows_a_send_and_replays_a_dead_letter(
    dashboard: tuple[str, Path], browser: Any, r: redis.Redis, prefix: str
) -> None:
    """The live page shows new entries after a send, a dead letter, and its replay."""
    url, config = dashboard
    browser.get(url)
    wait_for_sync(lambda: browser.find_element("id", "live").text == "live", what="SSE")
    before = _count(browser, "entries")
    assert before >= 0
    _send(config, {"kind": "good"})
    # tasks and done each gain one: seen without reloading the page
    wait_for_sync(lambda: _count(browser, "entries") == before + 2, timeout=20, what="counts")

    _send(config, {"kind": "bad"})
    ids = wait_for_sync(lambda: _dead_ids(browser), timeout=20, what="a dead letter listed")
    dead_id = ids[0]
    assert r.xrange(f"{prefix}dlq", dead_id, dead_id)
    wait_for_sync(lambda: _count(browser, "dead_letters") == 1, timeout=20, what="the count")
    wait_for_sync(
        lambda: _click(browser, f'tr[data-dlq-id="{dead_id}"] button[data-action="replay"]'),
        what="the replay button",
    )
    wait_for_sync(
        lambda: dead_id not in _dead_ids(browser),
        timeout=20,
        what="the replayed dead letter to leave the list",
    )
    assert "replay: 1 done" in browser.find_element("id", "dlq-result").text
    assert r.xlen(f"{prefix}dlq") == 0
    # the replayed task went through this time: routed on to done, nothing left pending
    wait_for_sync(lambda: r.xpending(f"{prefix}tasks", "router")["pending"] == 0, what="ack")
    wait_for_sync(lambda: _count(browser, "dead_letters") == 0, timeout=20, what="count")


def test_a_replay_without_the_csrf_token_is_refused(
    dashboard: tuple[str, Path], browser: Any, r: redis.Redis, prefix: str
) -> None:
    """A POST from the page's own origin but without the CSRF header changes nothing."""
    url, config = dashboard
    _send(config, {"kind": "bad"})
    wait_for_sync(lambda: r.xlen(f"{prefix}dlq") == 1, timeout=20, what="the dead letter")
    listed: Any = r.xrange(f"{prefix}dlq")
    dead_id = listed[0][0]
    browser.get(url)
    status = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch("/ui/dlq/replay", {method: "POST", headers: {"Content-Type": "application/json"},
          body: JSON.stringify({key: arguments[0], ids: [arguments[1]]})})
          .then(r => done(r.status));
        """,
        f"{prefix}dlq",
        dead_id,
    )
    assert status == 403
    assert r.xlen(f"{prefix}dlq") == 1
