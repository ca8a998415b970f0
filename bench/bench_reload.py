"""Benchmark: hot reload under steady load, with exact accounting by message id.

    .venv/bin/python bench/bench_reload.py [--quick] [--rate 20000] [--reloads 50]

A private redis-server on a free port; the runner in this process, watching its files
with the real watcher (debounce 200ms); a producer process publishing at ``--rate``
msg/s across the four priority streams, every entry with a unique integer ``id``
(every 5th addressed to an agent, so it travels on through an inbox group). The
producer never runs more than ``--window`` seconds of load ahead of what was handled,
so a runner slower than the target sets the achieved rate instead of a backlog.

1. ``--reloads`` windows of ``--spacing`` seconds, each opening with a file edit seen by
   the watcher, cycling route change / agent added or removed / group setting change
   (batch), and each followed by a quiet window of the same length (interleaved, so the
   drift of a long run cancels out). Per edit: latency from the file write to the outcome
   being recorded and to the new topology serving (the first message on the new route;
   the replaced consumer drained, its successor reading);
2. more edits back to back (each waited for) up to ``--total`` reloads, under load;
3. the producer stops; every id must be handled once, nothing pending in any group.

RSS, asyncio task count and Redis connections (CLIENT LIST) are sampled after 10
reloads and after the last. The untouched group (``audit``, the critical stream only,
never restarted) reports its throughput and longest pause, quiet versus reloading.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if __name__ == "__main__":
    # the flows import the handlers below as bench.bench_reload: make that this module
    sys.modules.setdefault("bench.bench_reload", sys.modules["__main__"])

import redis  # noqa: E402
import yaml  # noqa: E402

from bench.common import Server, rss_bytes  # noqa: E402
from cortex_flow.flow.loader import load_project  # noqa: E402
from cortex_flow.runtime.runner import Runner  # noqa: E402
from cortex_flow.wire.connection import CLIENT_NAME  # noqa: E402

PREFIX = "bench:reload"
PRIORITIES = ("critical", "high", "normal", "low")
AGENTS = ("harold", "worker")

# --- handlers (inline calls of the bench flows) ----------------------------------------------

COUNTS = bytearray(1 << 20)  # handled count by id, grown on demand
FIRST: dict[str, float | None] = {"a": None, "b": None}  # first call of each route variant
AUDIT = {"count": 0, "last": 0.0, "gap": 0.0}
HANDLED = [0]


def _record(msg: dict[str, str]) -> None:
    global COUNTS
    HANDLED[0] += 1
    n = int(msg["id"])
    if n >= len(COUNTS):
        COUNTS += bytearray(max(n + 1 - len(COUNTS), len(COUNTS)))
    if COUNTS[n] < 255:
        COUNTS[n] += 1


def handle_a(msg: dict[str, str]) -> None:
    if FIRST["a"] is None:
        FIRST["a"] = time.perf_counter()
    _record(msg)


def handle_b(msg: dict[str, str]) -> None:
    if FIRST["b"] is None:
        FIRST["b"] = time.perf_counter()
    _record(msg)


def inbox(msg: dict[str, str]) -> None:
    _record(msg)


def audit(msg: dict[str, str]) -> None:
    now = time.perf_counter()
    if AUDIT["last"]:
        AUDIT["gap"] = max(AUDIT["gap"], now - AUDIT["last"])
    AUDIT["last"] = now
    AUDIT["count"] += 1


# --- the producer process ----------------------------------------------------------------------

# XADDs ARGV[2] entries numbered from ARGV[1] round-robin over KEYS; every ARGV[3]-th
# one gets a `to` naming one of ARGV[4..] in turn
_PUBLISH = """
local start, count, every = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local agents = #ARGV - 3
for n = start, start + count - 1 do
  local key = KEYS[(n % #KEYS) + 1]
  if n % every == 0 then
    redis.call('XADD', key, '*', 'id', n, 'to', ARGV[4 + (math.floor(n / every) % agents)])
  else
    redis.call('XADD', key, '*', 'id', n)
  end
end
return start + count
"""


def produce(url: str, rate: float, window: int, published: Any, handled: Any, stop: Any) -> None:
    """Publish at ``rate`` msg/s until ``stop`` is set; ``published`` is the running count.

    Never more than ``window`` ahead of ``handled``: a runner slower than ``rate`` sets
    the pace instead of piling up a backlog (the achieved rate is then its throughput).
    """
    client = redis.Redis.from_url(url)
    script = client.register_script(_PUBLISH)
    keys = [f"{PREFIX}:tasks:{p}" for p in PRIORITIES]
    started = time.perf_counter()
    sent = 0
    while not stop.is_set():
        due = min(int((time.perf_counter() - started) * rate), handled.value + window)
        if due > sent:
            count = min(due - sent, 2000)
            sent = int(script(keys=keys, args=[sent, count, 5, *AGENTS]))
            published.value = sent
        else:
            time.sleep(0.002)
    client.close()


# --- the project -------------------------------------------------------------------------------


class Flows:
    """config.yaml and flows/ in a temporary folder; edits write one file each."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        (root / "flows").mkdir()
        config = {
            "redis": {"url": url},
            "flows": "flows/",
            "runner": {"name": "bench-reload", "shutdown_grace": "10s"},
            "reload": {"watch": True, "debounce": "200ms"},
            "admin": {"listen": "off"},
            "log": {"level": "warning"},
        }
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        streams = {
            "tasks": {"key": PREFIX + ":tasks:{{ priority }}", "priorities": list(PRIORITIES)},
            "inbox": {"key": PREFIX + ":messages:{{ agent }}"},
            "dlq": {"key": PREFIX + ":dlq"},
        }
        self._dump("streams.yaml", {"version": 1, "streams": streams})
        self.agents: dict[str, Any] = dict.fromkeys(AGENTS)
        self.route = "a"
        self.batch = 100
        self.write_agents()
        self.write_groups()

    def _dump(self, name: str, data: dict[str, Any]) -> None:
        (self.root / "flows" / name).write_text(yaml.safe_dump(data, sort_keys=False))

    def write_agents(self) -> None:
        self._dump("agents.yaml", {"version": 1, "agents": self.agents})

    def write_groups(self) -> None:
        call = f"bench.bench_reload:handle_{self.route}"
        groups = {
            "agents": {
                "stream": "tasks",
                "batch": self.batch,
                "dead_letter": "dlq",
                "routes": [
                    {"when": "msg.to in agents", "to": "inbox", "vars": {"agent": "{{ msg.to }}"}},
                    {"call": {"function": call, "inline": True}},
                ],
            },
            "inboxes": {
                "stream": "inbox",
                "dead_letter": "dlq",
                "routes": [{"call": {"function": "bench.bench_reload:inbox", "inline": True}}],
            },
            "audit": {
                "stream": "tasks",
                "vars": {"priority": "critical"},
                "routes": [{"call": {"function": "bench.bench_reload:audit", "inline": True}}],
            },
        }
        self._dump("groups.yaml", {"version": 1, "groups": groups})

    def edit(self, kind: str) -> None:
        """One change of ``kind``: route, agent (add or remove one) or setting (batch)."""
        if kind == "route":
            self.route = "b" if self.route == "a" else "a"
            FIRST[self.route] = None
            self.write_groups()
        elif kind == "agent":
            if "temp" in self.agents:
                del self.agents["temp"]
            else:
                self.agents["temp"] = None
            self.write_agents()
        else:
            self.batch = 50 if self.batch == 100 else 100
            self.write_groups()


KINDS = ("route", "agent", "setting")


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Window:
    """What happened in one measuring window, or in several added up."""

    seconds: float = 0.0
    published: int = 0
    handled: int = 0
    audit: int = 0
    gap: float = 0.0  # the audit group's longest pause between two messages
    started: float = 0.0
    marks: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def open(cls, published: int) -> Window:
        AUDIT["gap"], AUDIT["last"] = 0.0, 0.0
        return cls(started=time.perf_counter(), marks=(published, HANDLED[0], AUDIT["count"]))

    def close(self, published: int) -> Window:
        sent, done, audited = self.marks
        return Window(
            time.perf_counter() - self.started,
            published - sent,
            HANDLED[0] - done,
            AUDIT["count"] - audited,
            AUDIT["gap"],
        )

    def add(self, other: Window) -> None:
        self.seconds += other.seconds
        self.published += other.published
        self.handled += other.handled
        self.audit += other.audit
        self.gap = max(self.gap, other.gap)


def reload_count(runner: Runner) -> int:
    return sum(runner.stats.reload.totals.values())


async def until(predicate: Any, timeout: float = 30.0) -> float:
    """Poll every millisecond; the perf_counter time ``predicate`` first held."""
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise TimeoutError("benchmark condition not reached in time")
        await asyncio.sleep(0.001)
    return time.perf_counter()


async def settle(runner: Runner) -> None:
    """Wait until every replaced consumer has exited."""
    await until(lambda: not runner.running.retiring, timeout=60)


def footprint(runner: Runner, server: Server) -> dict[str, float]:
    gc.collect()
    with server.client() as client:
        clients = client.client_list()
    return {
        "rss_mb": rss_bytes() / 1e6,
        "tasks": len(asyncio.all_tasks()),
        "runner_connections": sum(1 for c in clients if c.get("name") == CLIENT_NAME),
        "all_connections": len(clients),
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def pending_everywhere(server: Server) -> int:
    total = 0
    with server.client() as client:
        for key in client.scan_iter(match=f"{PREFIX}:*", _type="stream"):
            for group in client.xinfo_groups(key):
                total += int(group["pending"])
    return total


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    server = Server().start()
    ctx = mp.get_context("spawn")
    published, handled, stop = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Event()
    window = int(args.rate * args.window)
    producer = ctx.Process(
        target=produce, args=(server.url, args.rate, window, published, handled, stop)
    )

    async def mirror() -> None:
        while not stop.is_set():
            handled.value = HANDLED[0]
            await asyncio.sleep(0.005)

    out: dict[str, Any] = {"redis": server.version, "rate_target": args.rate}
    with tempfile.TemporaryDirectory(prefix="cortex-bench-reload-") as tmp:
        flows = Flows(Path(tmp), server.url)
        runner = Runner(load_project(Path(tmp) / "config.yaml"), admin=False)
        await runner.start()
        try:
            # the OS watcher starts in the background: touch until it reports
            while reload_count(runner) == 0:
                (Path(tmp) / "flows" / "streams.yaml").touch()
                await asyncio.sleep(0.1)
            runner.stats.reload.totals.clear()
            mirroring = asyncio.create_task(mirror())
            producer.start()
            await asyncio.sleep(2.0)  # warm up: the producer fills its window

            # 1-2. reload windows through the watcher, each followed by a quiet window of
            # the same length: the throughput drift of a long run cancels out
            to_outcome: dict[str, list[float]] = {k: [] for k in KINDS}
            to_serving: dict[str, list[float]] = {k: [] for k in KINDS}
            totals = {p: Window() for p in ("quiet", "reload")}
            for i in range(args.reloads):
                kind = args.kinds[i % len(args.kinds)]
                window = Window.open(published.value)
                before = reload_count(runner)
                old = runner.consumers["agents" if kind == "setting" else "inboxes"]
                written = time.perf_counter()
                flows.edit(kind)
                applied = await until(lambda b=before: reload_count(runner) > b)
                if runner.stats.reload.last_outcome != "applied":
                    raise RuntimeError(f"reload {i + 1}: {runner.stats.reload.last_outcome}")
                if kind == "route":
                    route = flows.route
                    serving = await until(lambda r=route: FIRST[r] is not None)
                else:  # a restart: the old consumer drained, its successor reading
                    serving = await until(old.done.is_set)
                to_outcome[kind].append(applied - written)
                to_serving[kind].append(max(serving, applied) - written)
                await asyncio.sleep(max(0.0, args.spacing - (time.perf_counter() - written)))
                totals["reload"].add(window.close(published.value))
                if i + 1 == 10:
                    await settle(runner)
                    out["after_10"] = footprint(runner, server)
                window = Window.open(published.value)
                await asyncio.sleep(args.spacing)
                totals["quiet"].add(window.close(published.value))
            for phase, total in totals.items():
                out[f"{phase}_publish_rate"] = total.published / total.seconds
                out[f"{phase}_handle_rate"] = total.handled / total.seconds
                out[f"{phase}_audit_rate"] = total.audit / total.seconds
                out[f"{phase}_audit_gap_ms"] = total.gap * 1000
            out["to_outcome"] = to_outcome
            out["to_serving"] = to_serving

            # 2. back-to-back reloads up to the total, still under load
            while (done := reload_count(runner)) < args.total:
                flows.edit(args.kinds[done % len(args.kinds)])
                await until(lambda d=done: reload_count(runner) > d)
                if runner.stats.reload.last_outcome != "applied":
                    raise RuntimeError(f"reload {done + 1}: {runner.stats.reload.last_outcome}")

            # 3. stop the load, account for every id
            stop.set()
            await asyncio.to_thread(producer.join)
            await mirroring
            total = int(published.value)
            out["published"] = total
            out["backlog"] = total - sum(1 for c in COUNTS[:total] if c)
            t_end = time.perf_counter()

            def handled() -> bool:
                return COUNTS[:total].count(0) == 0

            await until(handled, timeout=300)
            out["drain_s"] = time.perf_counter() - t_end
            await settle(runner)
            for _ in range(100):  # the acks of the last batches
                if await pending_everywhere(server) == 0:
                    break
                await asyncio.sleep(0.05)
            seen = COUNTS[:total]
            out["lost"] = seen.count(0)
            out["duplicates"] = total - seen.count(1) - seen.count(0)
            out["beyond"] = sum(1 for c in COUNTS[total:] if c)
            out["pending"] = await pending_everywhere(server)
            out["reloads"] = dict(runner.stats.reload.totals)
            out["after_last"] = footprint(runner, server)
            out["after_last"]["reloads"] = reload_count(runner)
        finally:
            stop.set()
            if producer.is_alive():
                producer.join(10)
            await runner.stop(grace=10)
            server.stop()
    return out


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"hot reload under load (Redis {out['redis']}, {args.reloads} watcher reloads)")
    print(
        f"  load: target {args.rate:,.0f} msg/s (never more than {args.window:g}s of it "
        f"unhandled); achieved {out['quiet_publish_rate']:,.0f} msg/s quiet, "
        f"{out['reload_publish_rate']:,.0f} while reloading; {out['published']:,} in all"
    )
    print(
        f"  handled: {out['quiet_handle_rate']:,.0f} msg/s quiet, "
        f"{out['reload_handle_rate']:,.0f} while reloading; {out['backlog']:,} unhandled "
        "when the producer stopped"
    )
    print(
        f"  accounting: lost {out['lost']}, duplicates {out['duplicates']}, "
        f"unknown {out['beyond']}, pending at end {out['pending']} "
        f"(drained {out['drain_s']:.1f}s after the producer stopped)"
    )
    print(f"  reload outcomes: {out['reloads']}")
    print("  latency from file write (ms), debounce 200ms:")
    for kind in KINDS:
        a, s = out["to_outcome"][kind], out["to_serving"][kind]
        if not a:
            continue
        serving = {
            "route": "first message on the new route",
            "agent": "old inbox consumer drained",
            "setting": "old consumer drained",
        }[kind]
        print(
            f"    {kind:8} n={len(a):3}  outcome p50 {pct(a, 0.5) * 1000:6.0f} "
            f"p99 {pct(a, 0.99) * 1000:6.0f}   serving p50 {pct(s, 0.5) * 1000:6.0f} "
            f"p99 {pct(s, 0.99) * 1000:6.0f}  ({serving})"
        )
    every = [v for k in KINDS for v in out["to_serving"][k]]
    print(
        f"    all      n={len(every):3}  serving p50 {pct(every, 0.5) * 1000:6.0f} "
        f"p99 {pct(every, 0.99) * 1000:6.0f}  mean {statistics.mean(every) * 1000:.0f}"
    )
    # the audit group reads the critical stream: a quarter of what is published
    kept = {
        phase: out[f"{phase}_audit_rate"] / (out[f"{phase}_publish_rate"] / len(PRIORITIES))
        for phase in ("quiet", "reload")
    }
    print(
        f"  untouched group (audit, never restarted): {out['quiet_audit_rate']:,.0f} msg/s "
        f"quiet ({kept['quiet']:.0%} of its input), {out['reload_audit_rate']:,.0f} msg/s "
        f"while reloading ({kept['reload']:.0%}); longest pause between two of its "
        f"messages {out['quiet_audit_gap_ms']:.0f}ms quiet, "
        f"{out['reload_audit_gap_ms']:.0f}ms reloading"
    )
    for label in ("after_10", "after_last"):
        f = out[label]
        n = f.get("reloads", 10)
        print(
            f"  after {n:>3} reloads: RSS {f['rss_mb']:.1f} MB, {f['tasks']} asyncio tasks, "
            f"{f['runner_connections']} runner connections ({f['all_connections']} in CLIENT LIST)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="15 watcher reloads instead of 50")
    p.add_argument("--rate", type=float, default=20_000, help="target msg/s (default 20,000)")
    p.add_argument("--reloads", type=int, help="reloads through the watcher (50; quick 15)")
    p.add_argument("--total", type=int, default=200, help="reloads in all (default 200)")
    p.add_argument(
        "--spacing", type=float, default=0.4, help="seconds of each reload and quiet window"
    )
    p.add_argument(
        "--window", type=float, default=1.0, help="most unhandled, in seconds of --rate (1.0)"
    )
    p.add_argument("--kinds", default=",".join(KINDS), help="edits to cycle through")
    args = p.parse_args(argv)
    args.kinds = args.kinds.split(",")
    if not set(args.kinds) <= set(KINDS):
        p.error(f"--kinds: choose among {', '.join(KINDS)}")
    args.reloads = args.reloads or (15 if args.quick else 50)
    args.total = max(args.total, args.reloads)
    out = asyncio.run(bench(args))
    report(out, args)
    ok = out["lost"] == 0 and out["duplicates"] == 0 and out["pending"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
