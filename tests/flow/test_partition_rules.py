"""Partitioned streams and cluster slots in the flow language (no Redis needed)."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest
from redis.crc import key_slot as redis_key_slot

from cortex_flow.cli import cli
from cortex_flow.flow.loader import load_project
from cortex_flow.flow.slots import PartitionPicker, hash_tag, key_slot, partition_of
from cortex_flow.flow.topology import partitions_of, resolve


def test_key_slot_is_the_one_redis_computes() -> None:
    """The pure CRC16 gives the slot redis-py (and Redis) gives, hash tags included."""
    rng = random.Random(7)
    keys = ["cortex:tasks:high", "{cortex}:tasks:high", "a{}b", "{}", "x{p3}:y", "{p3"]
    keys += [
        "".join(rng.choice("abc{}:xyz0123") for _ in range(rng.randrange(1, 20)))
        for _ in range(500)
    ]
    for key in keys:
        assert key_slot(key) == redis_key_slot(key.encode()), key
    assert hash_tag("cortex:tasks:{p3}:high") == "p3"
    assert hash_tag("a{}b{c}") is None  # the first pair decides, and an empty one is no tag


def test_the_same_partition_key_always_picks_the_same_partition() -> None:
    """A partition_key's value maps to one partition (CRC32, stable across processes);
    without one, producers take the partitions in turn."""
    keyed = PartitionPicker(6, "{{ msg.conversation }}")
    picks = {c: keyed.pick({"conversation": c}) for c in map(str, range(60))}
    assert all(keyed.pick({"conversation": c}) == p for c, p in picks.items())
    assert picks["7"] == partition_of("7", 6)
    assert len(set(picks.values())) == 6
    turns = PartitionPicker(3, None)
    assert sorted(turns.pick({}) for _ in range(6)) == [0, 0, 1, 1, 2, 2]


FLOWS = """\
    version: 1
    streams:
      tasks:
        key: "cortex:tasks:{{ partition }}:{{ priority }}"
        priorities: [high, low]
        partitions: 3
        partition_key: "{{ msg.conversation }}"
      out: {key: "cortex:out"}
    groups:
      work:
        stream: tasks
        routes:
          - to: out
"""


def _write(tmp_path: Path, flows: str, url: str = "redis://127.0.0.1:6379") -> Path:
    (tmp_path / "flows").mkdir(exist_ok=True)
    (tmp_path / "flows" / "main.yaml").write_text(textwrap.dedent(flows))
    config = tmp_path / "config.yaml"
    config.write_text(f"redis: {{url: '{url}'}}\nflows: flows/\n")
    return config


def test_a_partitioned_stream_has_a_hash_tag_per_partition_and_a_group_reads_all(
    tmp_path: Path,
) -> None:
    """``{{ partition }}`` renders as {p0}..{pN-1}; a group's keys come partition by
    partition, each partition's levels in order and in one slot."""
    resolved = resolve(load_project(_write(tmp_path, FLOWS)).topology, "r")
    parts = partitions_of(resolved.groups["work"].keys)
    assert [[k.key for k in part] for part in parts] == [
        [f"cortex:tasks:{{p{i}}}:high", f"cortex:tasks:{{p{i}}}:low"] for i in range(3)
    ]
    assert all(len({key_slot(k.key) for k in part}) == 1 for part in parts)
    assert len({key_slot(part[0].key) for part in parts}) == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("{{ partition }}:", ""),
            "streams.tasks.key: a stream with partitions needs {{ partition }} in its key "
            '"cortex:tasks:{{ priority }}" (it becomes the hash tag {p0}, {p1}, ...); e.g. '
            '"cortex:tasks:{{ partition }}:{{ priority }}"',
        ),
        (
            ("partitions: 3", "description: no partitions"),
            "streams.tasks.key: the key uses {{ partition }} but the stream declares no "
            "partitions; add partitions: N (e.g. partitions: 6)",
        ),
        (
            ("cortex:tasks:", "{cortex}:tasks:"),
            'streams.tasks.key: the key "{cortex}:tasks:{{ partition }}:{{ priority }}" has '
            "another {...} before {{ partition }}, so that one is the hash tag and every "
            "partition lands in the same cluster slot; remove the other braces",
        ),
        (
            ("msg.conversation", "conversation"),
            'streams.tasks.partition_key: template uses unknown name "conversation"; the '
            "names available are msg",
        ),
        (
            ("- to: out", "- to: tasks\n            vars: {partition: '1'}"),
            "groups.work.routes[0].vars.partition: the partition is picked per message by "
            "the target stream's partition_key (or in turn); remove partition from vars and "
            'set partition_key on the stream "tasks"',
        ),
    ],
)
def test_partition_mistakes_are_reported_with_the_fix(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: tuple[str, str],
    message: str,
) -> None:
    """Each misuse of partitions is one problem naming the field and the fix."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, FLOWS.replace(*change))
    assert cli("validate") == 1
    out = capsys.readouterr().out
    assert message in out, out


UNTAGGED = """\
    version: 1
    streams:
      tasks:
        key: "cortex:tasks:{{ priority }}"
        priorities: [critical, high, normal, low]
    groups:
      agents:
        stream: tasks
        routes:
          - drop: true
"""


@pytest.mark.parametrize(
    "url", ["redis+cluster://127.0.0.1:7000", "redis://127.0.0.1:7000?cluster=true"]
)
def test_validate_on_a_cluster_names_a_group_whose_keys_span_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """With a cluster URL, a group over keys in several slots is a problem that gives the
    tagged spelling; the same flows against one server are fine, and so are tagged keys."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CORTEX_REDIS_URL", raising=False)
    _write(tmp_path, UNTAGGED, url)
    assert cli("validate") == 1
    out = capsys.readouterr().out
    assert out.startswith(
        'flows/main.yaml:8:13: groups.agents.stream: on a Redis Cluster the keys of stream "tasks" '
        "this group reads lie in 4 slots (cortex:tasks:critical, cortex:tasks:high, "
        "cortex:tasks:normal, cortex:tasks:low): it cannot wait on them in one read and polls "
        "them instead, and its publishes are not atomic with the XACK; give the key one hash "
        'tag, key: "{cortex:tasks}:{{ priority }}", or spread a busy stream over the masters '
        "with partitions: N and {{ partition }} in its key\n"
    ), out
    _write(tmp_path, UNTAGGED)
    assert cli("validate") == 0
    _write(tmp_path, UNTAGGED.replace("cortex:tasks:", "{cortex:tasks}:"), url)
    assert cli("validate") == 0
    _write(tmp_path, FLOWS, url)
    assert cli("validate") == 0
