"""What a CPU run gets from the machine: the engine's dtype, in-process vLLM, and each rank's share of the cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.engine.vllm import cpu_engine_settings, engine_dtype
from train.models import bf16_supported

ROOT = Path(__file__).resolve().parents[2]


def test_auto_engine_dtype_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    import torch

    assert engine_dtype("float32", on_gpu=False) == "float32" and engine_dtype("float16", on_gpu=False) == "float16"
    assert engine_dtype("auto", on_gpu=True) == "auto", "on a GPU vLLM picks the checkpoint's dtype"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert bf16_supported("cpu") and engine_dtype("auto", on_gpu=False) == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not bf16_supported("cpu") and engine_dtype("auto", on_gpu=False) == "float32"


def test_cpu_engine_runs_in_process_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    cpu_engine_settings()
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    cpu_engine_settings()
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def _threads(env: dict[str, str]) -> str:
    code = "from train.runtime.distributed import share_cpu_threads; import torch; print(share_cpu_threads(), torch.get_num_threads())"
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    res = subprocess.run([sys.executable, "-c", code], env=base | {"PYTHONPATH": str(ROOT)} | env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.split()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to split")
def test_ranks_sharing_a_machine_split_its_cores():
    cores = len(os.sched_getaffinity(0))
    assert _threads({"LOCAL_WORLD_SIZE": "2"}) == [str(cores // 2)] * 2
    assert _threads({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}) == ["None", "1"], "an explicit setting wins"
    assert _threads({})[0] == "None", "one process keeps torch's default"
