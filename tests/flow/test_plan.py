"""The plan: a pure diff of resolved topologies, drift against Redis, and `cortex-flow plan`."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import yaml

from cortex_flow.cli import cli
from cortex_flow.flow.config import Config
from cortex_flow.flow.loader import load_topology
from cortex_flow.flow.plan import Plan, diff
from cortex_flow.flow.topology import Resolved, resolve
from cortex_flow.ops.drift import drift, wrong_type_keys


def flow(prefix: str = "t:") -> dict[str, Any]:
    """A small topology: priority tasks, per-agent inboxes, a DLQ, events; two groups."""
    return {
        "version": 1,
        "streams": {
            "tasks": {
                "key": prefix + "tasks:{{ priority }}",
                "priorities": ["high", "low"],
                "maxlen": 1000,
            },
            "inbox": {"key": prefix + "messages:{{ agent }}"},
            "dlq": {"key": prefix + "dlq"},
            "events": {"key": prefix + "events", "maxlen": 10000},
        },
        "agents": {"harold": {"heartbeat": {"interval": "30s"}}},
        "groups": {
            "agents": {
                "stream": "tasks",
                "batch": 100,
                "dead_letter": "dlq",
                "routes": [
                    {"when": "msg.to in agents", "to": "inbox", "vars": {"agent": "{{ msg.to }}"}},
                    {"call": "workers.other:run"},
                ],
            },
            "harold": {
                "stream": "inbox",
                "vars": {"agent": "harold"},
                "routes": [{"call": "harold.main:handle"}],
            },
        },
    }


def resolved(tmp_path: Path, data: dict[str, Any], runner: str = "cortex") -> Resolved:
    """Write ``data`` as a flow file in a fresh folder, load and resolve it."""
    folder = tmp_path / uuid.uuid4().hex[:8]
    folder.mkdir()
    (folder / "flow.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return resolve(load_topology([folder], env={}), runner)


def plan_for(tmp_path: Path, change: Any) -> Plan:
    """The plan from the base flow to the base flow edited in place by ``change``."""
    target = flow()
    change(target)
    return diff(resolved(tmp_path, flow()), resolved(tmp_path, target))


def texts(plan: Plan) -> list[str]:
    return [str(c) for c in plan.changes]


# --- the pure diff -----------------------------------------------------------------------------


def test_same_flows_give_an_empty_plan(tmp_path: Path) -> None:
    """Two loads of the same flows compare equal by value: the plan is empty."""
    plan = diff(resolved(tmp_path, flow()), resolved(tmp_path, flow()))
    assert plan == Plan()
    assert plan.empty


def test_fresh_start_adds_everything(tmp_path: Path) -> None:
    """With no current topology every stream, agent, group and key is an add."""
    target = resolved(tmp_path, flow())
    plan = diff(None, target)
    assert {c.kind for c in plan.changes} == {"add"}
    assert plan.groups_to_add == ("agents", "harold")
    assert plan.keys_to_create == (
        "t:tasks:high",
        "t:tasks:low",
        "t:messages:harold",
        "t:dlq",
        "t:events",
    )
    assert "stream tasks: added (t:tasks:high, t:tasks:low)" in texts(plan)
    assert not plan.empty


def test_added_agent_adds_its_inbox_key(tmp_path: Path) -> None:
    """A new agent brings its inbox key; route tables that see `agents` are swapped."""
    plan = plan_for(tmp_path, lambda f: f["agents"].update(scout={}))
    assert texts(plan) == [
        "agent scout: declared (no heartbeat)",
        "agent scout: inbox t:messages:scout added",
    ]
    assert plan.keys_to_create == ("t:messages:scout",)
    assert plan.groups_routes_only == ("agents", "harold")
    assert plan.groups_to_restart == ()


def test_removed_group_is_listed_for_removal(tmp_path: Path) -> None:
    """A group gone from the flows is removed; the others are untouched."""
    plan = plan_for(tmp_path, lambda f: f["groups"].pop("harold"))
    assert plan.groups_to_remove == ("harold",)
    assert [(c.kind, c.what, c.name) for c in plan.changes] == [("remove", "group", "harold")]
    assert plan.groups_to_restart == plan.groups_routes_only == ()


def test_changed_batch_restarts_the_group(tmp_path: Path) -> None:
    """A changed consumer setting such as batch restarts the group."""
    plan = plan_for(tmp_path, lambda f: f["groups"]["harold"].update(batch=50))
    assert texts(plan) == ["group harold: batch 100 -> 50"]
    assert plan.groups_to_restart == ("harold",)
    assert plan.groups_routes_only == ()


def test_changed_when_swaps_routes_only(tmp_path: Path) -> None:
    """Changing only a route's `when` swaps the route table in place, without a restart."""
    plan = plan_for(
        tmp_path, lambda f: f["groups"]["agents"]["routes"][1].update(when="msg.type == 'x'")
    )
    assert texts(plan) == ["group agents: changed routes[1]: when none -> msg.type == 'x'"]
    assert plan.groups_routes_only == ("agents",)
    assert plan.groups_to_restart == ()


def test_added_route_is_described(tmp_path: Path) -> None:
    """An added route is named by its index and described in words."""
    route = {"when": "msg.type == 'batch'", "call": "workers.batch:run"}
    plan = plan_for(tmp_path, lambda f: f["groups"]["agents"]["routes"].append(route))
    assert texts(plan) == [
        "group agents: added routes[2] (when msg.type == 'batch' -> call workers.batch:run)"
    ]
    assert plan.groups_routes_only == ("agents",)


def test_changed_maxlen_is_a_stream_change(tmp_path: Path) -> None:
    """A changed maxlen is a stream change; groups that only publish there swap routes."""
    plan = plan_for(tmp_path, lambda f: f["streams"]["inbox"].update(maxlen=5000))
    assert texts(plan) == ["stream inbox: maxlen none -> 5000"]
    assert plan.groups_routes_only == ("agents",)  # publishes to inbox
    assert plan.groups_to_restart == ()  # harold reads inbox: maxlen does not concern it
    plan = plan_for(tmp_path, lambda f: f["streams"]["events"].update(maxlen=5000))
    assert texts(plan) == ["stream events: maxlen 10000 -> 5000"]
    assert plan.groups_routes_only == plan.groups_to_restart == ()


def test_changed_codec_restarts_the_readers(tmp_path: Path) -> None:
    """A stream's codec decides how its readers decode: the groups reading it restart."""
    plan = plan_for(tmp_path, lambda f: f["streams"]["tasks"].update(codec="json"))
    assert texts(plan) == ["stream tasks: codec raw -> json"]
    assert plan.groups_to_restart == ("agents",)


def test_changed_heartbeat_policy_is_an_agent_change(tmp_path: Path) -> None:
    """A changed heartbeat policy is reported on the agent and flags the monitor."""
    plan = plan_for(tmp_path, lambda f: f["agents"]["harold"]["heartbeat"].update(interval="10s"))
    assert texts(plan) == ["agent harold: heartbeat.interval 30s -> 10s"]
    assert plan.heartbeats_changed
    assert plan.groups_to_restart == plan.groups_routes_only == ()


def test_secrets_in_routes_are_never_printed(tmp_path: Path) -> None:
    """Header values, credential-named fields and URL passwords are never shown."""

    def hook(token: str, headers: dict[str, str]) -> dict[str, Any]:
        return {"http": {"url": f"https://bot:{token}@a2a.example/hook", "headers": headers}}

    def secrets(old: bool) -> Any:
        def change(f: dict[str, Any]) -> None:
            routes = f["groups"]["agents"]["routes"]
            routes[0]["set"] = {"type": "{{ msg.type }}", "Api-Key": f"k-{old}"}
            auth = {"Authorization": "Bearer s3cret-old" if old else "Bearer s3cret-new"}
            routes[1] = hook("pw-old" if old else "pw-new", auth)

        return change

    before, after = flow(), flow()
    secrets(True)(before)
    secrets(False)(after)
    plan = diff(resolved(tmp_path, before), resolved(tmp_path, after))
    assert texts(plan) == [
        "group agents: changed routes[0]: set.Api-Key changed (value hidden)",
        "group agents: changed routes[1]: http.url https://bot:***@a2a.example/hook -> "
        "https://bot:***@a2a.example/hook; http.headers.Authorization changed (value hidden)",
    ]
    grown = flow()
    grown["groups"]["agents"]["routes"].append(hook("pw-new", {"Authorization": "s3cret"}))
    added = diff(resolved(tmp_path, flow()), resolved(tmp_path, grown))
    assert texts(added) == [
        "group agents: added routes[2] (always -> http POST https://bot:***@a2a.example/hook)"
    ]


def test_added_headers_are_hidden(tmp_path: Path) -> None:
    """Headers added to a route read "changed (value hidden)", whatever their names."""
    before, after = flow(), flow()
    before["groups"]["agents"]["routes"][1] = {"http": {"url": "https://a2a.example/hook"}}
    after["groups"]["agents"]["routes"][1] = {
        "http": {"url": "https://a2a.example/hook", "headers": {"X-Api-Key": "abc123"}}
    }
    plan = diff(resolved(tmp_path, before), resolved(tmp_path, after))
    assert texts(plan) == [
        "group agents: changed routes[1]: http.headers.X-Api-Key changed (value hidden)"
    ]


def test_settings_read_at_start_require_a_restart(tmp_path: Path) -> None:
    """redis.url and runner.name cannot change while running; log.level can."""
    topology = resolved(tmp_path, flow())
    before = Config.model_validate({"redis": {"url": "redis://:secret@a:6379"}})
    after = Config.model_validate(
        {"redis": {"url": "redis://b:6379"}, "runner": {"name": "r2"}, "log": {"level": "debug"}}
    )
    plan = diff(topology, topology, before, after)
    assert texts(plan) == [
        "setting redis.url: redis://:***@a:6379 -> redis://b:6379 (needs a restart)",
        "setting runner.name: cortex -> r2 (needs a restart)",
        "setting log.level: info -> debug",
    ]
    assert [r.split(" ")[0] for r in plan.restart_required] == ["redis.url", "runner.name"]
    assert "secret" not in " ".join(plan.restart_required)
    assert not plan.empty


def test_admin_token_change_is_applied_and_never_shown(tmp_path: Path) -> None:
    """A new admin.token reloads (the endpoint reads it per request) and reads "value hidden"."""
    topology = resolved(tmp_path, flow())
    old, new = "old-token-0123456789", "new-token-0123456789"
    before = Config.model_validate({"admin": {"token": old}})
    after = Config.model_validate({"admin": {"token": new, "allowed_hosts": ["r1.internal"]}})
    plan = diff(topology, topology, before, after)
    assert texts(plan) == [
        "setting admin.allowed_hosts: [] -> [r1.internal]",
        "setting admin.token: changed (value hidden)",
    ]
    assert plan.restart_required == ()
    assert old not in repr(before) and new not in repr(after)


def test_new_runner_name_changes_every_consumer(tmp_path: Path) -> None:
    """Consumer names derive from the runner name, so every group restarts with a new one."""
    plan = diff(resolved(tmp_path, flow()), resolved(tmp_path, flow(), runner="other"))
    assert plan.groups_to_restart == ("agents", "harold")
    assert "group agents: consumer cortex -> other" in texts(plan)


# --- drift against a real Redis ----------------------------------------------------------------


async def test_drift_reports_foreign_groups_missing_keys_and_groups(
    tmp_path: Path, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """Drift finds undeclared groups and consumers, and what run would still create."""
    topology = resolved(tmp_path, flow(key_prefix))
    high, harold = f"{key_prefix}tasks:high", f"{key_prefix}messages:harold"
    await redis_client.xgroup_create(high, "agents", id="0", mkstream=True)
    await redis_client.xgroup_create(high, "legacy", id="0")
    await redis_client.xadd(high, {"type": "x"})
    await redis_client.xreadgroup("agents", "old-host", {high: ">"})
    await redis_client.xadd(harold, {"type": "x"})  # the stream exists, its group does not

    changes = await drift(redis_client, topology)

    assert [(c.kind, c.what, c.name) for c in changes] == [
        ("drift", "group", "legacy"),
        ("drift", "group", "agents"),
        ("add", "key", f"{key_prefix}tasks:low"),
        ("add", "group", "harold"),
    ]
    legacy, consumer, missing_key, missing_group = (str(c) for c in changes)
    assert legacy.startswith(f"group legacy: stale on {high}: no flow declares it there")
    assert legacy.endswith("`cortex-flow prune legacy` removes it")
    assert f"consumer old-host on {high} is not this runner's (cortex): 1 pending" in consumer
    assert missing_key.endswith("stream missing: run would create it with group(s) agents")
    assert (
        missing_group == f"group harold: missing on {harold}: run would create it (start earliest)"
    )


async def test_drift_leaves_a_key_that_is_not_a_stream_to_wrong_type_keys(
    tmp_path: Path, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    """A declared key that holds another type is a problem (run refuses), not drift."""
    topology = resolved(tmp_path, flow(key_prefix))
    await redis_client.set(f"{key_prefix}dlq", "oops")
    changes = await drift(redis_client, topology)
    assert not [c for c in changes if c.name == f"{key_prefix}dlq"]
    [problem] = await wrong_type_keys(redis_client, topology)
    assert problem.endswith(
        f"streams.dlq: key {key_prefix}dlq holds a string, not a stream; rename or delete "
        "that key in Redis, or change streams.dlq.key"
    )


# --- the command -------------------------------------------------------------------------------


def project(tmp_path: Path, url: str, prefix: str) -> Path:
    """A config.yaml and flows folder under ``tmp_path``; returns the config path."""
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "flow.yaml").write_text(yaml.safe_dump(flow(prefix), sort_keys=False))
    config = tmp_path / "config.yaml"
    settings = {"redis": {"url": url}, "runner": {"name": "plan-test"}, "admin": {"listen": "off"}}
    config.write_text(yaml.safe_dump(settings))
    return config


def test_command_exits_3_until_redis_has_everything(
    tmp_path: Path, redis_url: str, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan` exits 3 while run would create something, and 0 once Redis has it all."""
    config = str(project(tmp_path, redis_url, key_prefix))
    assert cli("plan", "--config", config) == 3
    out = capsys.readouterr().out
    assert f"  + key {key_prefix}tasks:high: stream missing" in out
    assert out.endswith("Plan: 3 to create, 0 to change, 0 to remove, 0 drift\n")

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for key, group in [
            ("tasks:high", "agents"),
            ("tasks:low", "agents"),
            ("messages:harold", "harold"),
        ]:
            client.xgroup_create(key_prefix + key, group, id="0", mkstream=True)
        client.xgroup_create(key_prefix + "tasks:high", "legacy", id="0")
    finally:
        client.close()
    assert cli("plan", "--config", config) == 0  # drift alone is informational
    out = capsys.readouterr().out
    assert "No changes" in out
    assert out.endswith("Plan: 0 to create, 0 to change, 0 to remove, 1 drift\n")


def test_command_prints_json(
    tmp_path: Path, redis_url: str, key_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--format json` prints the changes and a summary."""
    config = str(project(tmp_path, redis_url, key_prefix))
    assert cli("plan", "--config", config, "--format", "json") == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"] == {"create": 3, "change": 0, "remove": 0, "drift": 0}
    assert doc["changes"][0] == {
        "kind": "add",
        "what": "key",
        "name": f"{key_prefix}tasks:high",
        "detail": "stream missing: run would create it with group(s) agents",
        "text": doc["changes"][0]["text"],
    }
    assert (
        doc["changes"][0]["text"] == f"key {key_prefix}tasks:high: " + doc["changes"][0]["detail"]
    )
    assert doc["runner"] == "plan-test" and doc["compared_with"] == "redis"
    assert doc["notes"] == [
        "admin.listen is off, so no runner was asked: compared with Redis alone"
    ]


def test_command_shows_the_full_plan_without_redis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With Redis unreachable, `plan` still prints the whole topology as adds, with a note."""
    config = str(project(tmp_path, "redis://127.0.0.1:1", "t:"))
    assert cli("plan", "--config", config) == 3
    captured = capsys.readouterr()
    assert "note: Redis not reachable: showing the full plan" in captured.err
    assert "  + group harold: added (reads t:messages:harold;" in captured.out
    assert captured.out.endswith("Plan: 7 to create, 0 to change, 0 to remove, 0 drift\n")


def test_command_never_starts_an_embedded_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With `embedded` and no server running, `plan` shows the full plan and starts nothing."""
    config = str(project(tmp_path, "embedded", "t:"))
    assert cli("plan", "--config", config) == 3
    assert "note: embedded Redis is not running" in capsys.readouterr().err
    assert not (tmp_path / ".cortex" / "embedded.json").exists()


def test_command_exits_1_on_invalid_flows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid flows are reported and `plan` exits 1."""
    config = project(tmp_path, "redis://127.0.0.1:1", "t:")
    (tmp_path / "flows" / "flow.yaml").write_text("version: 1\ngroups: {g: {stream: nope}}\n")
    assert cli("plan", "--config", str(config)) == 1
    assert "flow.yaml" in capsys.readouterr().err


def test_route_tables_keep_no_unused_fingerprint(tmp_path: Path) -> None:
    """Route changes are found by :func:`diff`; a compiled table carries no copy of its routes."""
    from cortex_flow.runtime.routes import RouteTable

    data = flow()
    data["groups"]["agents"]["routes"][1] = {"drop": True}
    topology = resolved(tmp_path, data)
    streams = {name: s.spec for name, s in topology.streams.items()}
    table = RouteTable(topology.groups["agents"], streams, frozenset(topology.agents))
    assert len(table.routes) == 2
    assert not hasattr(table, "fingerprint")


def test_plan_has_no_admin_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`plan` reads the current side from Redis only; `--admin` is refused, not ignored."""
    config = str(project(tmp_path, "redis://127.0.0.1:1", "t:"))
    assert cli("plan", "--config", config, "--admin", "127.0.0.1:9000") == 2
    assert "unrecognized arguments: --admin" in capsys.readouterr().err


def test_changed_retention_of_the_dead_letter_stream_restarts_nothing(tmp_path: Path) -> None:
    """Retention is applied by the retention duty, never by a consumer: a group that
    dead-letters to a stream whose retention changed keeps running."""
    plan = plan_for(tmp_path, lambda f: f["streams"]["dlq"].update(retention={"max_age": "1h"}))
    assert texts(plan) == ["stream dlq: retention none -> {max_len: none, max_age: 1h}"]
    assert plan.groups_to_restart == ()
