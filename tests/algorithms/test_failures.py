"""Failures a user can cause or meet: each ends with a message that names the cause and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.integration
def test_engine_that_cannot_start_names_the_knob(tiny_model_dir, tmp_path):
    require("vllm")
    res = _cli(
        "run",
        "recipes/scpo/smollm2-135m-cpu.yaml",
        f"model={tiny_model_dir}",
        f"output_dir={tmp_path}/o",
        "sampling.kv_cache_gib=4096",  # more than this machine has
    )
    assert res.returncode == 1
    # vLLM's resource tracker may print its own shutdown warning after ours, so find our line.
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("selfreward: stopped:")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("selfreward: stopped: the vllm sampling engine failed to start"), lines[0]
    assert "sampling.kv_cache_gib (now 4096.0)" in lines[0]
    assert "Traceback" not in res.stderr.split(lines[0])[-1]


def test_zero_pairs_stops_with_a_clear_message(tiny_model_dir, tmp_path):
    # The random tiny model never produces two agreeing numbers, so no pair clears τ = 1.0·k.
    res = _cli(
        "run",
        "recipes/scpo/smollm2-135m-cpu.yaml",
        f"model={tiny_model_dir}",
        f"output_dir={tmp_path}/o",
        "sampling.engine=hf",
        "max_prompts=2",
        "scpo.num_samples=2",
        "sampling.max_tokens=4",
        "scpo.vote_threshold=[1.0]",
        "eval.enabled=false",
    )
    assert res.returncode == 1, res.stderr[-2000:]
    assert "iteration 1 produced 0 preference pairs" in res.stderr and "lower scpo.vote_threshold" in res.stderr
    assert not (tmp_path / "o" / "iter_1" / "adapter").exists(), "never trains on nothing"
    assert (tmp_path / "o" / "iter_1" / "pairs.jsonl").read_text() == ""


def test_out_of_memory_in_training_names_the_fixes(tiny_model_dir, tmp_path):
    # A real allocator failure (128 TiB), raised inside the train phase the way a too-large batch fails.
    import torch

    from train.config import load_recipe
    from train.errors import StopRun
    from train.loop import Run

    recipe = load_recipe(
        ROOT / "recipes/scpo/smollm2-135m-cpu.yaml", [f"output_dir={tmp_path}", f"model={tiny_model_dir}"]
    )
    run = Run(recipe)
    artifact = tmp_path / "iter_1" / "adapter"
    with pytest.raises(StopRun) as err:
        run.phase(1, "train", artifact, lambda: {"x": torch.empty(2**45)})
    msg = str(err.value)
    assert msg.startswith("iter 1: phase `train` ran out of memory (RuntimeError:")
    for knob in ("per_device_train_batch_size (now 8)", "gradient_checkpointing=true", "zero3.yaml"):
        assert knob in msg, msg
    assert not artifact.exists() and not (tmp_path / "iter_1" / "phases" / "train.json").exists()
