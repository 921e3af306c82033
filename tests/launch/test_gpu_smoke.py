"""scripts/gpu_smoke.py's CPU dry run: every stage of the GPU smoke test at tiny shapes, and the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, ensure_tool

ROOT = Path(__file__).resolve().parents[2]
STAGES = {"dpo_iter1", "dpo_iter2", "score_stage1", "zero3"}


@pytest.mark.slow
def test_gpu_smoke_dry_run(tmp_path):
    # ZeRO-3 on CPU needs DeepSpeed and a C++ compiler (its comm op JIT-builds once, then is cached); CI has both.
    gxx, why = ensure_tool("g++", "g++")  # installed here when missing, as root with apt-get
    zero3_possible = importlib.util.find_spec("deepspeed") is not None and gxx is not None
    if IN_CI:
        assert zero3_possible, f"CI installs deepspeed (scripts/setup.sh) and g++ (.ci/run, or here): {why}"
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--tiny", "--out", str(out)]
    res = subprocess.run(
        [*cmd, "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    log = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 0, log

    report = json.loads((out / "gpu_smoke.json").read_text())
    assert report["tiny"] is True and report["device"] == "cpu"
    # the venv has everything: nothing is pip-installed (a GPU image without TRL installs from the wheelhouse)
    assert report["installed_from_wheelhouse"] == [] and report["install_error"] is None
    assert report["versions"]["trl"] and report["versions"]["torch"]
    stages = report["stages"]
    assert set(stages) == STAGES
    if not zero3_possible:
        assert stages["zero3"]["status"] == "skipped" and stages["zero3"]["reason"], stages["zero3"]
    ran = {name: s for name, s in stages.items() if s["status"] != "skipped"}
    assert set(ran) == STAGES - ({"zero3"} if not zero3_possible else set())
    for name, s in ran.items():
        assert s["status"] == "ok", (name, s, log)
        assert s["steps"] == 2 and s["seconds_per_step"] > 0 and s["first_step_s"] > 0, (name, s)
        # CPU: float32 base (model_dtype "auto" = float32 off GPU) and float32 LoRA
        assert s["base_dtype"] == "float32" and s["lora_dtype"] == "float32", (name, s)
        assert s["trainable_params"] > 0 and s["model_dtype_arg"] in ("auto", None), (name, s)
        assert s["peak_allocated_gib"] is None and s["peak_reserved_gib"] is None, (name, s)
        assert s["allocated_after_free_gib"] is None, (name, s)
        assert s["model"] == ("tiny-qwen2" if name == "score_stage1" else "tiny-llama")
        assert s["zero3_partitioned"] is (name == "zero3"), (name, s)
    if "zero3" in ran:  # really DeepSpeed ZeRO-3, not a silent fallback to plain training
        assert ran["zero3"]["engine"] == "DEEPSPEED ZeRO-3", ran["zero3"]
        assert (out / "zero3.log").is_file()
