"""The JSON Schema files accept the repo's own flows and every YAML example in the docs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from cortex_flow.flow import schema as schemas
from cortex_flow.flow.source import load_yaml

ROOT = Path(__file__).resolve().parents[2]
_MODELINE = re.compile(r"yaml-language-server: \$schema=\S*?([a-z]+\.schema\.json)")
_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.MULTILINE | re.DOTALL)


class _AsWritten(Mapping[str, str]):
    """An environment in which every ``${VAR}`` stays as written, as an editor sees it."""

    def __getitem__(self, name: str) -> str:
        return "${" + name + "}"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _validator(name: str) -> jsonschema.Draft202012Validator:
    data = json.loads((ROOT / "schemas" / name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(data)
    return jsonschema.Draft202012Validator(data)


def _errors(name: str, text: str, where: str) -> list[str]:
    data = load_yaml(where, text=text, env=_AsWritten()).data
    found = _validator(name).iter_errors(data)
    return [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def _repo_files() -> list[tuple[str, Path]]:
    files = [("config.schema.json", ROOT / "config.yaml")]
    for path in sorted((ROOT / "flows").iterdir()):
        if path.name.endswith(".test.yaml"):
            files.append(("flowtest.schema.json", path))
        elif path.suffix == ".yaml":
            files.append(("flow.schema.json", path))
    return files


def _doc_blocks() -> list[tuple[str, str, str]]:
    blocks = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for found in _BLOCK.finditer(text):
            block, line = found.group(1), text[: found.start()].count("\n") + 2
            named = _MODELINE.search(block)
            if named is not None:
                kind = named.group(1)
            elif re.search(r"^version: 1$", block, re.MULTILINE):
                kind = "flow.schema.json"
            else:
                continue  # a fragment of a file, not a whole one
            blocks.append((kind, block, f"{page.relative_to(ROOT)}:{line}"))
    return blocks


@pytest.mark.parametrize(("kind", "path"), _repo_files(), ids=lambda v: getattr(v, "name", v))
def test_repo_files_satisfy_their_schema(kind: str, path: Path) -> None:
    """config.yaml, flows/*.yaml and flows/*.test.yaml pass their JSON Schema as written
    (flows/groups.yaml holds ${CORTEX_A2A_URL:-...} in http.url)."""
    assert _errors(kind, path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []


def test_doc_examples_satisfy_their_schema() -> None:
    """Every fenced YAML example in README.md and docs/ that is a whole file passes its
    schema, ${VAR} references included."""
    blocks = _doc_blocks()
    assert len(blocks) >= 4
    assert [e for kind, text, where in blocks for e in _errors(kind, text, where)] == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("concurrency", "${WORKERS:-8}"),
        ("priority", "${PRIORITY}"),
        ("retry.claim_idle", "${CLAIM_IDLE:-60s}"),
        ("stream", "${STREAM:-tasks}"),
    ],
)
def test_every_interpolated_field_accepts_a_reference(field: str, value: str) -> None:
    """Numbers, enums, durations and names accept ${VAR} / ${VAR:-default}; a plain wrong
    value is still refused."""
    group: dict[str, Any] = {"stream": "tasks", "routes": [{"drop": True}]}
    head, _, leaf = field.rpartition(".")
    (group.setdefault(head, {}) if head else group)[leaf] = value
    flow = {"version": 1, "streams": {"tasks": {"key": "t"}}, "groups": {"g": group}}
    validator = jsonschema.Draft202012Validator(
        schemas.generate(schemas.SCHEMAS["flow.schema.json"])
    )
    assert list(validator.iter_errors(flow)) == []
    (group.setdefault(head, {}) if head else group)[leaf] = "not valid"
    assert list(validator.iter_errors(flow)) != []
