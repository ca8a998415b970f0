"""pyproject.toml installs quietly: metadata in the form current setuptools expects."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_license_is_an_spdx_string_with_a_backend_that_reads_it() -> None:
    """`project.license` is an SPDX expression, not the deprecated table (which made
    setuptools print ~40 lines of warnings on every install), and the build backend is
    recent enough to accept it (setuptools 77, PEP 639)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert data["project"]["license"] == "MIT"
    [backend] = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    found = re.fullmatch(r"setuptools>=(\d+)", backend)
    assert found is not None and int(found.group(1)) >= 77
    assert not any("License ::" in c for c in data["project"].get("classifiers", []))
