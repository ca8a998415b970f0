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
