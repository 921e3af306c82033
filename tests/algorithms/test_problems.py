"""ScPO's self-written problems: writing, dedupe, vote filter, and their place in the iteration (tiny model, HF)."""

from __future__ import annotations

import json

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


def test_generated_problems_are_deduped_filtered_and_trained_on(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # τ = 0: every usable, new candidate is kept (the random model's votes never agree); 6 wanted, at most 8 tried
    code = main(["run", RECIPE, *tiny_scpo(tiny_model_dir, out, "scpo.new_problems=6", "scpo.problem_candidates=8",
                                            "scpo.problem_exemplars=2")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    rows = [json.loads(x) for x in (out / "iter_1" / "problems.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) <= 6 and all(r["origin"] == "generated" and len(r["exemplars"]) == 2 for r in rows)
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
    assert (out / "iter_1" / "problems.jsonl").read_text() == "", "no generated problem has unanimous votes"
