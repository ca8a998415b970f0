"""The package's layers hold: contracts, no private names across modules, a pure flow/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cortex_flow"


def test_import_contracts_are_kept() -> None:
    """import-linter's layers, forbidden and acyclic contracts (pyproject.toml) all hold."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_no_module_uses_another_modules_private_names() -> None:
    """No ``from cortex_flow.x import _name`` and no ``other._name`` but on self/cls."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cortex_flow"):
                found += [
                    f"{path.name}:{node.lineno} imports {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                owner = node.value
                if node.attr.startswith("__") or (
                    isinstance(owner, ast.Name) and owner.id in ("self", "cls", "os")
                ):
                    continue  # own names, dunders, os._exit (the CLI's hard exit)
                if node.attr == "_replace":
                    continue  # namedtuple's public API
                found.append(f"{path.name}:{node.lineno} uses {ast.unparse(node)}")
    assert found == []


def test_flow_layer_loads_without_redis_or_asyncio() -> None:
    """Importing every flow/ module (what validate needs) loads no redis, asyncio or aiohttp."""
    modules = sorted(p.stem for p in (PACKAGE / "flow").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        + "".join(f"import cortex_flow.flow.{m}\n" for m in modules)
        + "print(sorted(m for m in ('redis', 'asyncio', 'aiohttp') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_package_top_holds_only_a_few_modules() -> None:
    """Everything but the package face, errors, version and the client lives in a layer."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "client.py", "errors.py", "version.py"]
