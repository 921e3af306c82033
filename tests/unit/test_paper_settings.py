"""docs/paper-settings.md and the paper-settings recipes agree: every `recipe key -> recipe value` row of the doc's
tables equals the recipe as `load_recipe` returns it, and every recipe that is not a `smollm2-*` CPU demo has a
section. Editing a recipe value without the doc (or the doc without the recipe) fails here."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from train.config import load_recipe
from train.config.loading import RECIPE_PATHS

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "paper-settings.md"
NOT_APPLICABLE = "—"
SECTION_RE = re.compile(r"^##\s+`(recipes/[^`]+\.yaml)`\s*$")


def paper_recipes() -> list[Path]:
    """Every recipe under recipes/ except the accelerate configs and the `smollm2-*` CPU demos."""
    return sorted(
        p
        for p in (ROOT / "recipes").rglob("*.yaml")
        if "accelerate" not in p.relative_to(ROOT / "recipes").parts and not p.name.startswith("smollm2-")
    )


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _unquote(cell: str) -> str:
    cell = cell.strip()
    return cell[1:-1] if len(cell) >= 2 and cell[0] == cell[-1] == "`" else cell


def parse_doc(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """{recipe path: [(line number, recipe key, recipe value cell)]} from the tables under each `## `recipe`` heading.
    A table counts when its header has `recipe key` and `recipe value` columns."""
    sections: dict[str, list[tuple[int, str, str]]] = {}
    current: str | None = None
    columns: tuple[int, int] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            m = SECTION_RE.match(line)
            current = m.group(1) if m else None
            if current is not None:
                assert current not in sections, f"{DOC.name}:{n}: a second section for {current}"
                sections[current] = []
            columns = None
            continue
        if not line.lstrip().startswith("|"):
            columns = None  # a table ends at its first non-table line
            continue
        cells = _cells(line)
        if columns is None:
            if "recipe key" in cells and "recipe value" in cells:
                columns = cells.index("recipe key"), cells.index("recipe value")
            continue
        if all(set(c) <= set("-: ") for c in cells):  # the |---|---| separator row
            continue
        if current is None:
            continue
        assert len(cells) > max(columns), f"{DOC.name}:{n}: row has {len(cells)} cells, expected more"
        key, value = _unquote(cells[columns[0]]), _unquote(cells[columns[1]])
        if key == NOT_APPLICABLE:
            continue
        sections[current].append((n, key, value))
    return sections


def recipe_value(recipe: Any, key: str) -> Any:
    """The loaded recipe's value at a dotted key; `trainer.*` keys look in the free-form TRL mapping."""
    head, *rest = key.split(".")
    if head == "trainer":
        assert rest, "trainer needs a key"
        node: Any = recipe.trainer
        for part in rest:
            assert isinstance(node, dict) and part in node, f"`{key}` is not set in the recipe's trainer section"
            node = node[part]
        return node
    node = recipe
    for part in key.split("."):
        assert node is not None and hasattr(node, part), f"`{key}` is not a recipe key"
        node = getattr(node, part)
    return node


def same(expected: Any, actual: Any) -> bool:
    if isinstance(actual, bool) or isinstance(expected, bool):
        return expected is actual
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        return math.isclose(float(expected), float(actual), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(same(e, a) for e, a in zip(expected, actual))
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(same(expected[k], actual[k]) for k in actual)
    return expected == actual


def expected_value(cell: str, actual: Any) -> Any:
    """A string setting is compared as the cell's literal text; anything else as a YAML scalar, list or mapping
    (`5.0e-5`, `[0.5, 0.7]`, `null`, `{min_lr_rate: 0.1}`)."""
    if isinstance(actual, str):
        return cell
    parsed = yaml.safe_load(cell)
    if isinstance(parsed, str) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return float(parsed)  # `5e-6` without a dot is a string to YAML 1.1
        except ValueError:
            return parsed
    return parsed


DOC_SECTIONS = parse_doc(DOC.read_text(encoding="utf-8"))


def test_every_paper_recipe_has_a_section():
    wanted = {str(p.relative_to(ROOT)) for p in paper_recipes()}
    assert wanted, "no paper-settings recipes found"
    missing = sorted(wanted - DOC_SECTIONS.keys())
    assert not missing, f"{DOC.relative_to(ROOT)} has no `## `recipe`` section for: {missing}"
    unknown = sorted(DOC_SECTIONS.keys() - wanted)
    assert not unknown, f"{DOC.relative_to(ROOT)} has sections for recipes that do not exist: {unknown}"


@pytest.mark.parametrize("path", paper_recipes(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_rows_match_the_recipe(path):
    rel = str(path.relative_to(ROOT))
    rows = DOC_SECTIONS.get(rel)
    assert rows, f"no `recipe key -> recipe value` rows for {rel} in {DOC.name}"
    recipe = load_recipe(path)
    wrong = []
    for line, key, cell in rows:
        actual = recipe_value(recipe, key)
        if tuple(key.split(".")) in RECIPE_PATHS and isinstance(actual, str):
            actual = os.path.relpath(actual, path.parent)  # a file path: as the recipe writes it, relative to it
        expected = expected_value(cell, actual)
        if not same(expected, actual):
            wrong.append(f"{DOC.name}:{line}: `{key}` is {actual!r} in {rel}, the doc says {cell!r}")
    assert not wrong, "\n".join(wrong)


def test_the_parser_reads_rows_and_skips_not_applicable():
    text = (
        "## `recipes/x/y.yaml`\n\n| hyperparameter | paper | recipe key | recipe value | where |\n|---|---|---|---|---|\n"
        "| k | 8 | `scpo.num_samples` | `8` | §3 |\n| w | formula | — | — | §2 |\n\nprose | with a pipe\n"
        "## Other\n| a | recipe key | recipe value |\n|---|---|---|\n| b | `model` | `m` |\n"
    )
    assert parse_doc(text) == {"recipes/x/y.yaml": [(5, "scpo.num_samples", "8")]}


def test_a_changed_value_is_caught():
    """The comparison the rows go through: a recipe value that differs from the doc's is not `same`."""
    assert same(expected_value("5.0e-5", 5e-5), 5e-5) and same(expected_value("5e-5", 5e-5), 5e-5)
    assert not same(expected_value("5.0e-5", 5e-6), 5e-6)
    assert same(expected_value("[0.5, 0.7]", [0.5, 0.7]), [0.5, 0.7])
    assert not same(expected_value("[0.5, 0.7]", [0.5, 0.6]), [0.5, 0.6])
    assert same(expected_value("null", None), None) and not same(expected_value("null", "algebra"), "algebra")
    assert same(expected_value("10", 10.0), 10.0) and not same(expected_value("1", True), True)
    assert same(expected_value("{min_lr_rate: 0.1}", {"min_lr_rate": 0.1}), {"min_lr_rate": 0.1})
    assert same(expected_value(r"put it in \boxed{}.", r"put it in \boxed{}."), r"put it in \boxed{}.")
