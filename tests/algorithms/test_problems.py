"""Self-written prompts (ScPO: vote filter; Self-Rewarding: Self-Instruct filters) and per-iteration seed slices
(tiny model, HF)."""

from __future__ import annotations

import json
import re

import pytest

from tests.algorithms.test_faults import RECIPE, tiny_scpo
from train.algorithms.problems import arithmetic_truth, clean_problem, normalise
from train.cli import main


def test_problem_text_helpers():
    assert clean_problem("Problem: What is 3 + 4?\n\nSolution: 7") == "What is 3 + 4?"
    assert clean_problem("\n\n  New problem 2: What is 9 - 1?") == "What is 9 - 1?"
    assert clean_problem("  \n") is None
    assert normalise("What is 3 + 4?") == normalise("  what IS 3 +  4 ") == "what is 3 + 4"
    assert arithmetic_truth("What is 12 + 7?") == "19" and arithmetic_truth("What is 5 - 9?") == "-4"
    assert arithmetic_truth("Compute the area of a circle") is None


@pytest.mark.slow  # whole pipeline runs on the tiny model
def test_generated_problems_are_deduped_filtered_and_trained_on(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # τ = 0: every usable, new candidate is kept (the random model's votes never agree); 6 wanted, at most 8 tried
    code = main(["run", RECIPE, *tiny_scpo(tiny_model_dir, out, "scpo.new_problems=6", "scpo.problem_candidates=8",
                                            "scpo.problem_exemplars=2")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    listed = [json.loads(x) for x in (out / "iter_1" / "problems.jsonl").read_text().splitlines()]
    assert [r["origin"] for r in listed[:4]] == ["seed"] * 4 and all(r["exemplars"] == [] for r in listed[:4])
    rows = listed[4:]
    assert 1 <= len(rows) <= 6 and all(r["origin"] == "generated" and len(r["exemplars"]) == 2 for r in rows)
    assert all(set(r) == {"id", "prompt", "origin", "exemplars", "vote_share", "majority"} for r in rows)
    seeds = {normalise(f"What is {a} + {b}?") for a in range(21) for b in range(10)}
    assert len({normalise(r["prompt"]) for r in rows}) == len(rows), "no duplicates among kept problems"
    assert not {normalise(r["prompt"]) for r in rows} & seeds
    metrics = json.loads((out / "iter_1" / "phases" / "problems.json").read_text())["metrics"]
    assert metrics["kept"] == len(rows) and metrics["candidates"] <= 8 and 0 <= metrics["well_formed_rate"] <= 1
    sampled = {json.loads(x)["prompt_id"] for x in (out / "iter_1" / "samples.jsonl").read_text().splitlines()}
    assert {r["id"] for r in rows} <= sampled and len(sampled) == 4 + len(rows), "seeds (4) plus kept problems"

    # A stricter threshold needs new problems: the problems phase and everything after it is redone.
    code = main(["run", RECIPE, *tiny_scpo(tiny_model_dir, out, "scpo.new_problems=6", "scpo.problem_candidates=8",
                                            "scpo.problem_exemplars=2", "scpo.vote_threshold=[1.0]")])  # fmt: skip
    err = capsys.readouterr().err
    assert "iter 1: problems is stale (tau: 0.0 -> 1.0)" in err
    origins = [json.loads(x)["origin"] for x in (out / "iter_1" / "problems.jsonl").read_text().splitlines()]
    assert origins == ["seed"] * 4, "no generated problem has unanimous votes"


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow  # whole pipeline runs on the tiny model
def test_each_iteration_trains_on_its_own_slice_and_the_key_is_in_the_fingerprint(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_scpo(tiny_model_dir, out, "iterations=2", "data.prompts_per_iteration=2")  # 4 prompts: 2 + 2
    code = main(["run", RECIPE, *args])
    assert code == 0, capsys.readouterr().err[-3000:]
    ids = [[r["prompt_id"] for r in _rows(out / f"iter_{k}" / "samples.jsonl")] for k in (1, 2)]
    assert all(len(set(i)) == 2 and len(i) == 4 for i in ids), "2 prompts x 2 samples per iteration"
    assert not set(ids[0]) & set(ids[1]), "no iteration repeats an earlier one's prompts"
    assert set(ids[0]) | set(ids[1]) == {f"arith-{i}" for i in range(2, 6)}, "together: the 4 training prompts"
    capsys.readouterr()

    assert main(["status", RECIPE, *args]) == 0
    assert not re.search(r"(stale|missing)", capsys.readouterr().out), "unchanged: every phase is done"
    assert main(["status", RECIPE, *args, "data.prompts_per_iteration=1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re.match(r"1\s+generate\s+stale\s+.*prompts", line) for line in lines), lines
    assert any(re.match(r"2\s+train\s+stale", line) for line in lines), lines


def test_self_rewarding_writes_instructions_filtered_and_deduped(tiny_model_dir, tmp_path):
    """Self-instruction creation (self_instruct.py) through the real HF sampler on the tiny model: iteration 1 keeps
    new instructions; iteration 2, writing from the same one-seed pool with the same random state, writes the same
    texts and drops every one as a duplicate of iteration 1's."""
    import torch

    from train.algorithms.self_instruct import generate_instructions
    from train.config import Recipe
    from train.loop import Run

    pool = [{"id": "s0", "prompt": "Give three tips for staying healthy.", "answer": None}]

    def write(k: int, **cfg) -> tuple[dict, list[dict]]:
        recipe = Recipe.model_validate({
            "algorithm": "self_rewarding", "output_dir": str(tmp_path), "model": tiny_model_dir,
            "sampling": {"engine": "hf", "batch_size": 3, "max_tokens": 24},
            "meta_rewarding": {"new_problems": 2, "problem_candidates": 2, "problem_exemplars": 1, **cfg}})  # fmt: skip
        run = Run(recipe)
        run.iter_dir(k).mkdir(parents=True, exist_ok=True)
        assert run.sharded_sampler is not None  # build the engine, then draw from the same random state both times
        torch.manual_seed(0)
        return generate_instructions(run, k, pool, pool), _rows(run.iter_dir(k) / "problems.jsonl")

    metrics, rows = write(1)
    assert rows[0] == {"id": "s0", "prompt": pool[0]["prompt"], "origin": "seed", "exemplars": []}
    generated = rows[1:]
    assert metrics["kept"] == len(generated) == 2 and metrics["candidates"] == 2
    assert all(set(r) == {"id", "prompt", "origin", "exemplars"} for r in generated), "no vote_share: no gold, no vote"
    assert all(r["origin"] == "generated" and r["exemplars"] == ["s0"] for r in generated)
    assert len({normalise(r["prompt"]) for r in generated}) == 2

    metrics, rows = write(2, seed_problems=False)
    assert rows == [] and metrics["kept"] == 0
    assert metrics["duplicates"] == 2 and metrics["candidates"] == 2, metrics


def test_self_rewarding_runs_its_problems_phase_before_generate(tiny_model_dir, tmp_path, capsys):
    recipe = "recipes/self_rewarding/smollm2-135m-cpu.yaml"
    args = [f"model={tiny_model_dir}", f"output_dir={tmp_path}", "iterations=2", "data.prompts_per_iteration=3"]
    assert main(["status", recipe, *args, "meta_rewarding.new_problems=2"]) == 0
    phases = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert phases[1:4] == [["1", "problems"], ["1", "generate"], ["1", "judge"]], phases  # after iteration 0 eval
    assert main(["status", recipe, *args]) == 0
    assert ["1", "problems"] not in [line.split()[:2] for line in capsys.readouterr().out.splitlines()], "off: no phase"
