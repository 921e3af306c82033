"""The one recipe schema: every shipped recipe validates; user mistakes exit 2 naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import ConfigError, load_recipe
from train.config.reference import render_reference

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_recipes_found_recursively():
    algos = {p.parent.name for p in RECIPES}
    assert {"scpo", "meta_rewarding", "self_rewarding"} <= algos


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.algorithm == path.parent.name
    first = path.read_text().splitlines()[:4]
    assert any("selfreward run" in line or "-m train run" in line for line in first), (
        "first lines give the launch command"
    )


def test_self_rewarding_is_meta_rewarding_without_meta_judge(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("algorithm: self_rewarding\noutput_dir: x\n")
    r = load_recipe(p)
    assert r.meta_rewarding is not None and r.meta_rewarding.meta_judge is False


def test_overrides_apply_with_types(tmp_path):
    r = load_recipe(
        ROOT / "recipes/scpo/smollm2-135m-cpu.yaml",
        ["sampling.temperature=0.9", "iterations=1", "scpo.vote_threshold=[0.25]", "trainer.max_steps=3"],
    )
    assert r.sampling.temperature == 0.9 and r.iterations == 1
    assert r.scpo.vote_threshold == [0.25] and r.trainer["max_steps"] == 3


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["bogus=1"], "unknown key `bogus`"),
        (["sampling.tempreature=0.5"], "unknown key `sampling.tempreature`"),
        (["sampling.temperature=hot"], "`sampling.temperature`"),
        (["trainer.learning_rat=1"], "trainer.learning_rat"),
        (["scpo.vote_threshold=[1.5]"], "`scpo.vote_threshold`"),
        (["meta_rewarding.beta=0.1"], "section `meta_rewarding` does not apply"),
        (["iterations"], "override `iterations`"),
        (["sampling=3"], "`sampling`"),
        (["algorithm=ppo"], "`algorithm`"),
    ],
)
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_recipe(ROOT / "recipes/scpo/smollm2-135m-cpu.yaml", overrides)
    assert needle in str(e.value)


def test_missing_required_and_bad_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("algorithm: scpo\n")
    with pytest.raises(ConfigError, match="missing required key `output_dir`"):
        load_recipe(p)
    p.write_text("algorithm: scpo\noutput_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(p)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "recipes/scpo/smollm2-135m-cpu.yaml", "sampling.nope=1"], "sampling.nope"),
        (["run", "missing.yaml"], "missing.yaml"),
        (["run", "recipes/scpo/smollm2-135m-cpu.yaml", "data.source=jsonl"], "data.train_file"),
        (
            ["run", "recipes/scpo/smollm2-135m-cpu.yaml", "data.source=jsonl", "data.train_file=nope.jsonl"],
            "nope.jsonl",
        ),
    ],
)
def test_cli_user_errors_exit_2_one_line_no_traceback(args, needle, tmp_path, cli, monkeypatch):
    # In process (the `cli` fixture): an uncaught exception would fail the test here, as a traceback would below.
    monkeypatch.chdir(ROOT)
    code, _, err = cli(*args, f"output_dir={tmp_path}/out" if args[0] == "run" and len(args) > 2 else "output_dir=x")
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("selfreward: error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err


def test_dataset_row_missing_field_names_row_and_field(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "What is 1 + 1?"}\n{"question": "no prompt key"}\n')
    code, _, err = cli(
        "run",
        "recipes/scpo/smollm2-135m-cpu.yaml",
        "data.source=jsonl",
        f"data.train_file={data}",
        f"output_dir={tmp_path}/out",
    )
    assert code == 2, err
    assert f"{data}:2: missing field `prompt`" in err


def test_reference_doc_is_current():
    doc = (ROOT / "docs/recipe-reference.md").read_text()
    assert doc.strip() == render_reference().strip(), "run `make docs` to regenerate docs/recipe-reference.md"
    for key in ("`sampling.engine`", "`scpo.vote_threshold`", "`meta_rewarding.length_rho`", "`score.beta2`"):
        assert key in doc
