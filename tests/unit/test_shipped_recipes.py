"""Every shipped recipe validates as it ships: `selfreward validate <recipe>` exits 0 on a fresh checkout, with no file
the repository does not ship (an optional phase whose inputs the user builds, such as `sft:`, ships disabled)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(
    p.relative_to(ROOT)
    for p in (ROOT / "recipes").rglob("*.yaml")
    if "accelerate" not in p.relative_to(ROOT / "recipes").parts  # launcher configs, not recipes
)


def test_there_are_recipes():
    assert len(RECIPES) >= 9 and all(p.parts[0] == "recipes" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=str)
def test_shipped_recipe_validates(cli, monkeypatch, recipe):
    monkeypatch.chdir(ROOT)
    code, out, err = cli("validate", recipe)
    assert (code, out.strip()) == (0, f"ok  {recipe}"), err
