"""New prompts each iteration: disjoint seed slices (`data.prompts_per_iteration`) and Self-Instruct's filters for
Self-/Meta-Rewarding's self-written instructions (train/algorithms/self_instruct.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.algorithms.self_instruct import rejection, rouge_l, rouge_tokens, too_similar
from train.config.schema import DataConfig
from train.data import ConfigError, iteration_items

ROOT = Path(__file__).resolve().parents[2]
POOL = [{"id": f"p{i}", "prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(10)]


def test_slices_are_disjoint_cover_the_pool_and_are_fixed_by_the_seed():
    cfg = DataConfig(prompts_per_iteration=5)
    slices = [[it["id"] for it in iteration_items(POOL, cfg, k, 2, seed=3)] for k in (1, 2)]
    assert all(len(s) == 5 for s in slices)
    assert not set(slices[0]) & set(slices[1]) and set(slices[0]) | set(slices[1]) == {it["id"] for it in POOL}
    assert slices == [[it["id"] for it in iteration_items(POOL, cfg, k, 2, seed=3)] for k in (1, 2)], "a rerun"
    assert slices[0] == [it["id"] for it in iteration_items(POOL, cfg, 1, 1, seed=3)], "iterations do not reshuffle"
    assert slices != [[it["id"] for it in iteration_items(POOL, cfg, k, 2, seed=4)] for k in (1, 2)], "another seed"
    assert iteration_items(POOL, DataConfig(), 2, 2, seed=3) == POOL, "unset: every iteration gets the whole pool"


def test_too_small_pool_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"data\.prompts_per_iteration=4 x iterations=3 needs 12 .* there are 10"):
        iteration_items(POOL, DataConfig(prompts_per_iteration=4), 1, 3, seed=0)


@pytest.mark.parametrize(
    "recipe, overrides, needle",
    [
        ("scpo", ["max_prompts=6", "iterations=2", "data.prompts_per_iteration=4"], "data.prompts_per_iteration=4 x "),
        ("self_rewarding", ["max_prompts=5", "iterations=3", "data.prompts_per_iteration=2"], "needs 6 training"),
        ("score", ["data.prompts_per_iteration=2"], "data.prompts_per_iteration: SCoRe has no iterations"),
    ],
)
def test_cli_refuses_before_the_run_with_one_line(recipe, overrides, needle, cli, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    code, _, err = cli("validate", f"recipes/{recipe}/smollm2-135m-cpu.yaml", *overrides)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("selfreward: error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err


def test_rouge_l_matches_rouge_score_on_literal_strings():
    # rouge_score: tokens lower-cased [a-z0-9] runs; F = 2·LCS / (|a| + |b|) for ROUGE-L
    assert rouge_tokens("Write a poem, about CATS!") == ["write", "a", "poem", "about", "cats"]
    assert rouge_l(rouge_tokens("the cat sat on the mat"), rouge_tokens("the cat lay on a mat")) == pytest.approx(
        2 * 4 / 12
    )
    assert rouge_l(["a", "b", "c", "d"], ["d", "c", "b", "a"]) == pytest.approx(2 * 1 / 8)
    assert rouge_l([], ["a"]) == 0.0


def test_too_similar_uses_self_instructs_threshold():
    seeds = [rouge_tokens("Give three tips for staying healthy.")]
    assert too_similar(rouge_tokens("Give three tips for staying healthy and fit."), seeds)  # 2·6/13 = 0.92
    assert not too_similar(rouge_tokens("Give three tips for a job interview."), seeds)  # 2·3/13 = 0.46
    assert not too_similar(rouge_tokens("Describe the water cycle in simple words."), seeds)


@pytest.mark.parametrize(
    "text, why",
    [
        ("Explain how a rainbow forms.", None),
        ("Summarise it.", "length"),
        (" ".join(["word"] * 151), "length"),
        ("Describe the image below in detail.", "keyword"),
        ("Plot the data as a bar chart please.", "keyword"),
        ("write a program that prints the primes below 100.", "program"),
        ("- List three rivers in Europe please.", "punctuation"),
        ("Über alles: describe the history of Berlin.", "non_ascii"),
        ("Name the files in a typical Linux home folder.", "keyword"),
        ("Describe a mapping between two sets.", None),  # whole words only: `map` is not in `mapping`
    ],
)
def test_self_instruct_text_filters(text, why):
    assert rejection(text) == why
