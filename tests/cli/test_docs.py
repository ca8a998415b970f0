"""The generated reference stays in sync with the models."""

from __future__ import annotations

from pathlib import Path

from cortex_flow.flow import docgen

ROOT = Path(__file__).resolve().parents[2]


def test_reference_matches_models() -> None:
    """docs/reference.md equals what docgen renders from the models (run docgen if not)."""
    assert (ROOT / "docs" / "reference.md").read_text(encoding="utf-8") == docgen.render()


def test_reference_documents_every_group_field() -> None:
    """Every GroupSpec field appears in the reference by its YAML name."""
    from cortex_flow.flow.models import GroupSpec

    text = docgen.render()
    for name, field in GroupSpec.model_fields.items():
        assert f"`{field.alias or name}`" in text


def test_architecture_page_names_only_files_that_exist() -> None:
    """Every module path docs/architecture.md names is a file of the package."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:cli|testing|gateway|ops|runtime|wire|flow)/[a-z_]+\.py)", text))
    assert len(named) > 20
    missing = sorted(p for p in named if not (ROOT / "cortex_flow" / p).exists())
    assert missing == []
    layers = {p.name for p in (ROOT / "cortex_flow").iterdir() if (p / "__init__.py").exists()}
    assert layers == {"cli", "testing", "gateway", "ops", "runtime", "wire", "flow"}
    assert all(f"\n{layer}/ " in text for layer in layers)  # each in the layer picture
