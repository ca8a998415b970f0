"""``cortex-flow status``: streams, groups, agents and dead letters at a glance.

:func:`collect` reads what Redis knows in two pipelined rounds (plus a few pages of
heartbeats when an agent is not among the newest) and never reads a stream in full:
only XLEN, XINFO, XPENDING and ranges of COUNT 1. ``cortex-flow status``
(:mod:`cortex_flow.cli.status`) turns the data into tables or prints it as JSON.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from cortex_flow.flow.config import AdminSettings
from cortex_flow.flow.durations import humanize
from cortex_flow.flow.loader import Project
from cortex_flow.flow.topology import Resolved, no_reader, unread_inboxes
from cortex_flow.ops.admin import admin_get
from cortex_flow.ops.flowstatus import delayed_rows, in_flight_warnings
from cortex_flow.ops.stale import count_lag, stale_from_infos
from cortex_flow.runtime.duties import DUTIES
from cortex_flow.runtime.retention import held_key
from cortex_flow.wire.connection import RedisClient, describe_client, describe_error, is_cluster
from cortex_flow.wire.delayed import SUMMARY as DELAYED_SUMMARY
from cortex_flow.wire.delayed import index_key as delayed_index
from cortex_flow.wire.entryids import id_ms
from cortex_flow.wire.heartbeats import PAGE as HEARTBEAT_PAGE
from cortex_flow.wire.heartbeats import latest_beats
from cortex_flow.wire.lag import STATUS_CAP, group_lags
from cortex_flow.wire.redis_errors import explain, redis_user

__all__ = ["collect", "probe_admin", "snapshot"]

HEARTBEAT_SCAN = 10_000  # newest heartbeat entries read at most to find every agent


# --- collecting ------------------------------------------------------------------------------


def _ok(value: Any) -> Any:
    """A pipeline reply, or None when that command failed (missing key or group)."""
    return None if isinstance(value, Exception) else value


async def collect(
    client: RedisClient, resolved: Resolved, *, now: float | None = None
) -> dict[str, Any]:
    """What Redis knows about ``resolved``: plain data (JSON-ready), ages in seconds.

    ``now`` (epoch seconds) defaults to the server's clock, so ages do not depend on
    this machine's. Missing streams and groups are reported as ``missing``.
    """
    keys = resolved.keys()
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
        pipe.xlen(key)
        pipe.xrange(key, count=1)
        pipe.xrevrange(key, count=1)
    pipe.xrevrange(resolved.runner_key, count=HEARTBEAT_PAGE)
    pipe.hgetall(held_key(resolved))
    for duty in DUTIES:
        pipe.get(resolved.duty_key(duty))
    pipe.eval(DELAYED_SUMMARY, 1, delayed_index(resolved.namespace))
    if now is None and is_cluster(client):
        now = time.time()  # TIME has no key, so a cluster pipeline cannot route it
    if now is None:
        pipe.time()
    replies = list(await pipe.execute(raise_on_error=False))
    if now is None:
        seconds, micros = replies.pop()
        now = seconds + micros / 1e6
    now_ms = now * 1000

    def age(entry_id: str | None) -> float | None:
        return None if entry_id is None else round(max(0.0, now_ms - id_ms(entry_id)) / 1000, 3)

    streams: dict[str, dict[str, Any]] = {}
    for index, (key, sk) in enumerate(keys.items()):
        kind, length, first, last = replies[index * 4 : index * 4 + 4]
        status = "ok" if kind == "stream" else "missing" if kind == "none" else f"a {kind}"
        first_id = first[0][0] if status == "ok" and _ok(first) else None
        last_id = last[0][0] if status == "ok" and _ok(last) else None
        streams[key] = {
            "name": sk.stream,
            "key": key,
            "priority": sk.priority,
            "agent": sk.agent,
            "status": status if isinstance(kind, str) else "error",
            "error": None if isinstance(kind, str) else _refusal(client, kind, key),
            "length": length if status == "ok" and not isinstance(length, Exception) else None,
            "first_id": first_id,
            "last_id": last_id,
            "oldest_age": age(first_id),
            "newest_age": age(last_id),
        }
    beats, held = replies[len(keys) * 4 : len(keys) * 4 + 2]
    leases = replies[len(keys) * 4 + 2 : len(keys) * 4 + 2 + len(DUTIES)]
    delayed = replies[len(keys) * 4 + 2 + len(DUTIES)]
    dynamic = [
        {"name": s.name, "key": s.spec.key, "status": "dynamic", "length": None}
        for s in resolved.streams.values()
        if s.dynamic
    ]
    groups, infos = await _groups(client, resolved, streams, age)
    agents, runner_age = await _agents(client, resolved, streams, _ok(beats) or [], age)
    dlq_keys = sorted({g.dead_letter for g in resolved.groups.values() if g.dead_letter})
    dead_letters = [
        {k: streams[key][k] for k in ("key", "status", "length", "oldest_age", "newest_age")}
        if key in streams
        else {"key": key, "status": "undeclared", "length": None}
        for key in dlq_keys
    ]
    data: dict[str, Any] = {
        "now": round(now, 3),
        "runner": {"name": resolved.runner, "heartbeat_age": runner_age},
        "streams": list(streams.values()) + dynamic,
        "groups": groups,
        "agents": agents,
        "dead_letters": dead_letters,
        "duties": [_duty(name, _ok(value)) for name, value in zip(DUTIES, leases, strict=True)],
        "retention": _held_rows(_ok(held) or {}, now),
        "stale_groups": await count_lag(client, stale_from_infos(resolved, infos)),
        "delayed": delayed_rows(delayed, now),
    }
    data["problems"] = problems(data, resolved)
    return data


def _refusal(client: RedisClient, error: BaseException, key: str) -> str:
    """Why reading ``key`` failed: an ACL refusal with the grant that fixes it."""
    why = explain(error, user=redis_user(client), command="TYPE", keys=[key])
    return why.text if why is not None else describe_error(error)


def _duty(name: str, value: Any) -> dict[str, Any]:
    """Who holds a duty: its token and the holder (``host:pid:start_ms``), or nobody."""
    text = value.decode() if isinstance(value, bytes) else value
    if not text:
        return {"name": name, "token": None, "holder": None}
    token, _, holder = str(text).partition(" ")
    return {"name": name, "token": int(token) if token.isdigit() else None, "holder": holder}


def _held_rows(raw: dict[Any, Any], now: float) -> list[dict[str, Any]]:
    """The keys the retention duty found held above their cap, and by which group."""
    rows = []
    for key, value in sorted(raw.items()):
        try:
            record = json.loads(value)
        except ValueError:
            continue
        since = float(record.get("since") or now)
        rows.append(
            {
                "key": key.decode() if isinstance(key, bytes) else key,
                "stream": record.get("stream"),
                "group": record.get("group"),
                "held": record.get("held"),
                "max_len": record.get("max_len"),
                "floor": record.get("floor"),
                "since": since,
                "held_for": round(max(0.0, now - since), 3),
            }
        )
    return rows


async def _groups(
    client: RedisClient, resolved: Resolved, streams: dict[str, dict[str, Any]], age: Any
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    live = [key for key, s in streams.items() if s["status"] == "ok"]
    pairs = [(g, k.key) for g in resolved.groups.values() for k in g.keys if k.key in live]
    pipe = client.pipeline(transaction=False)
    for key in live:
        pipe.xinfo_groups(key)
    for group, key in pairs:
        pipe.xinfo_consumers(key, group.name)
        pipe.xpending_range(key, group.name, min="-", max="+", count=1)
    replies = list(await pipe.execute(raise_on_error=False)) if live else []
    infos = {key: _ok(reply) or [] for key, reply in zip(live, replies, strict=False)}
    extra = iter(replies[len(live) :])
    details = {(g.name, key): (_ok(next(extra)), _ok(next(extra))) for g, key in pairs}
    out = []
    for group in resolved.groups.values():
        for sk in group.keys:
            row: dict[str, Any] = {"name": group.name, "key": sk.key, "priority": sk.priority}
            stream = streams.get(sk.key, {})
            info = next((i for i in infos.get(sk.key, []) if i["name"] == group.name), None)
            if info is None:
                row["status"] = "missing" if stream.get("status") == "ok" else "stream missing"
                out.append(row)
                continue
            consumers, oldest = details[(group.name, sk.key)]
            first = (oldest or [None])[0]
            last_delivered = info["last-delivered-id"]
            row |= {
                "status": "ok",
                "pending": info["pending"],
                "lag": info.get("lag"),  # checked against the entry IDs below
                "last_delivered_id": last_delivered,
                "oldest_pending_age": age(first["message_id"]) if first else None,
                "oldest_pending_idle": first["time_since_delivered"] / 1000 if first else None,
                "oldest_pending_deliveries": first["times_delivered"] if first else None,
                "stale": bool(first)
                and first["time_since_delivered"] / 1000 > stale_after(resolved, group.name),
                "consumers": [
                    {"name": c["name"], "pending": c["pending"], "idle": c["idle"] / 1000}
                    for c in consumers or []
                ],
            }
            out.append(row)
    ok = [r for r in out if r.get("status") == "ok"]
    newest = {key: s.get("last_id") for key, s in streams.items() if s.get("status") == "ok"}
    lags = await group_lags(
        client, [(r["key"], r["last_delivered_id"], r["lag"]) for r in ok], newest, STATUS_CAP
    )
    for row in ok:
        row["lag"] = lags[(row["key"], row["last_delivered_id"])]
    return out, infos


async def _agents(
    client: RedisClient,
    resolved: Resolved,
    streams: dict[str, dict[str, Any]],
    page: list[tuple[str, dict[str, str]]],
    age: Any,
) -> tuple[list[dict[str, Any]], float | None]:
    """Each agent's last heartbeat, read newest first until all are found or the bound."""
    wanted = {name for name, spec in resolved.agents.items() if spec.heartbeat is not None}
    hb_key = resolved.heartbeat_key
    heartbeats = resolved.topology.heartbeats
    codec = resolved.topology.streams[heartbeats.stream].codec if heartbeats else "raw"
    latest = await latest_beats(
        client,
        resolved.runner_key,
        codec,
        wanted=wanted if hb_key is not None else set(),
        first_page=page,
        limit=HEARTBEAT_SCAN,
    )
    own = latest.runner(resolved.runner)
    runner_beat = own.entry_id if own is not None else None
    agents = []
    readers: dict[str, list[str]] = {}  # key -> who reads it: "group g" or "client (group g)"
    for group in resolved.groups.values():
        who = f"group {group.name}" if group.by_runner else f"client (group {group.name})"
        for k in group.keys:
            readers.setdefault(k.key, []).append(who)
    for name, spec in sorted(resolved.agents.items()):
        inbox = [s for s in streams.values() if s["agent"] == name]
        row: dict[str, Any] = {
            "name": name,
            "inbox": sum(s["length"] or 0 for s in inbox) if inbox else None,
            "inbox_keys": [s["key"] for s in inbox],
            "read_by": sorted({r for s in inbox for r in readers.get(s["key"], [])}),
            "timeout": spec.heartbeat.effective_timeout if spec.heartbeat else None,
            "heartbeat_age": None,
            "reported": None,
        }
        beat = latest.agents.get(name)
        if beat is not None:
            row["heartbeat_age"] = age(beat.entry_id)
            row["reported"] = beat.status
        if spec.heartbeat is None or hb_key is None:
            row["status"] = "unwatched"
            row["why"] = "no heartbeat declared" if hb_key else "no heartbeats stream declared"
        elif row["heartbeat_age"] is None:
            row["status"] = "never seen"
        else:
            row["status"] = "up" if row["heartbeat_age"] <= row["timeout"] else "down"
        agents.append(row)
    return agents, age(runner_beat)


def problems(data: dict[str, Any], resolved: Resolved) -> list[str]:
    """One sentence per thing that needs a person: agents down, dead letters, stuck work."""
    found = []
    for agent in data["agents"]:
        if agent["status"] == "down":
            found.append(
                f"agent {agent['name']} is down: last heartbeat {humanize(agent['heartbeat_age'])}"
                f" ago, timeout {humanize(agent['timeout'])}"
            )
        elif agent["status"] == "never seen":
            found.append(
                f"agent {agent['name']} has sent no heartbeat to {resolved.heartbeat_key} "
                f"(checked the newest {HEARTBEAT_SCAN:,} entries)"
            )
    for name, keys in unread_inboxes(resolved).items():
        found.append(no_reader(name, keys))
    for dlq in data["dead_letters"]:
        if dlq["length"]:
            found.append(
                f"{dlq['key']} holds {dlq['length']:,} dead letter(s), the oldest "
                f"{humanize(dlq['oldest_age'])} old; inspect them with `cortex-flow dlq list`"
            )
    for stream in data["streams"]:
        if stream["status"] == "error":
            found.append(f"cannot read {stream['key']}: {stream['error']}")
        elif stream["status"] not in ("ok", "missing", "dynamic"):
            found.append(f"{stream['key']} is {stream['status']}, not a stream; rename one")
    for held in data["retention"]:
        found.append(
            f"group {held['group']} holds {held['key']} {held['held']:,} entries above its "
            f"max_len {held['max_len']:,} (unread or pending there, so kept) for "
            f"{humanize(held['held_for'])}; give the group more consumers"
        )
    for stale in data["stale_groups"]:
        if stale["holds"] == 0:
            continue  # listed in the table; it holds nothing back yet
        holds = "an unknown number of" if stale["holds"] is None else f"{stale['holds']:,}"
        found.append(
            f"group {stale['name']} on {stale['key']} is declared by no flow and holds "
            f"{holds} entries from retention ({stale['pending']:,} pending); "
            f"`cortex-flow prune {stale['name']}` removes it"
        )
    found += [str(p) for p in in_flight_warnings(data["groups"], resolved)]
    for group in data["groups"]:
        where = f"group {group['name']} on {group['key']}"
        if group["status"] == "missing":
            found.append(f"{where} does not exist; `cortex-flow run` creates it")
        if group.get("stale"):
            found.append(
                f"{where}: the oldest pending entry has waited "
                f"{humanize(group['oldest_pending_idle'])} since its "
                f"last delivery; is its consumer stuck?"
            )
    return found


def stale_after(resolved: Resolved, group: str) -> float:
    """How long a pending entry may sit idle before status calls it stuck."""
    retry = resolved.groups[group].spec.retry
    return 2 * max(retry.claim_idle, retry.backoff.max)


async def probe_admin(admin: AdminSettings) -> dict[str, Any]:
    """GET the runner's ``/readyz``: readiness and the outcome of its last reload."""
    status, body = await admin_get(admin, "/readyz")
    if status is None:
        if admin.host_port is None:
            return {"admin": None, "reachable": False, "reason": body}
        return {"admin": admin.listen, "reachable": False, "reason": body}
    if status in (401, 403) and isinstance(body, dict):  # the guard's {"error", "fix"}
        refused = f"it refused the request: {body.get('error')}; {body.get('fix')}"
        return {"admin": admin.listen, "reachable": False, "reason": refused}
    if not isinstance(body, dict) or "status" not in body:
        reason = body.get("error") if isinstance(body, dict) and "error" in body else None
        why = f"answered {status}: {reason}" if reason else "not a cortex-flow runner"
        return {"admin": admin.listen, "reachable": False, "reason": why}
    # /readyz answers {"status": "ready" | "not ready", "detail": {..., "reload": {...}}}
    raw = body.get("detail")
    detail: dict[str, Any] = raw if isinstance(raw, dict) else {}
    reload = detail.get("reload")
    if isinstance(reload, dict) and isinstance(reload.get("last_at"), int | float):
        # the runner's clock, as is its epoch: an age reads better than an epoch float
        reload = {**reload, "last_age": max(0.0, time.time() - reload["last_at"])}
    return {
        "admin": admin.listen,
        "reachable": True,
        "ready": body.get("status") == "ready",
        "reload": reload,
        "problems": [str(p) for p in detail.get("problems") or []],
        "flow": detail.get("flow") or {},
        "stuck_calls": detail.get("stuck_calls") or {},
    }


# --- the command ------------------------------------------------------------------------------


async def snapshot(client: RedisClient, project: Project, resolved: Resolved) -> dict[str, Any]:
    """``collect`` plus where Redis is and what the runner's admin endpoint says."""
    data, admin = await asyncio.gather(collect(client, resolved), probe_admin(project.config.admin))
    data = {"redis": describe_client(client), **data}
    data["runner"]["admin_status"] = admin
    if not admin["reachable"] and admin["admin"] is not None:
        data["problems"].append(
            f"runner {resolved.runner} is not reachable at {admin['admin']} ({admin['reason']})"
        )
    # what Redis refuses the runner (ACL, credentials, TLS, DNS), as the runner sees it
    data["problems"].extend(f"runner {resolved.runner}: {p}" for p in admin.get("problems", []))
    for group, stuck in sorted(admin.get("stuck_calls", {}).items()):
        held = stuck.get("held_back")
        data["problems"].append(
            f"group {group}: {stuck.get('stuck')} sync call(s) stuck past their timeout "
            f"(max_stuck_calls {stuck.get('max_stuck_calls')})"
            + ("; it starts no new message until one returns" if held else "")
        )
    return data
