"""The grouped CPU LoRA ops compute exactly what vLLM's own torch ops compute, and the plugin installs them."""

from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from tests.conftest import require
from train.engine import vllm_cpu_lora


def _vllm_ops():
    """A private copy of vLLM's lora_ops module, untouched by the plugin (which may already be loaded)."""
    require("vllm")
    spec = importlib.util.find_spec("vllm.lora.ops.torch_ops.lora_ops")
    fresh = importlib.util.spec_from_file_location("_vllm_lora_ops_reference", spec.origin)
    module = importlib.util.module_from_spec(fresh)
    fresh.loader.exec_module(module)
    return module


CASES = [
    pytest.param([0] * 7, id="one-adapter"),
    pytest.param([1, 0, 1, 1, 0, 2, 2], id="mixed-slots"),
    pytest.param([-1, 0, -1, 0, 0, 0, -1], id="with-no-lora-index"),
]


@pytest.mark.parametrize("indices", CASES)
@pytest.mark.parametrize("four_dim", [False, True])
def test_shrink_and_expand_match_vllm(indices, four_dim):
    ref = _vllm_ops()
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor(indices)
    tokens, hidden, rank, slots = len(indices), 24, 4, 3
    x = torch.randn(tokens, hidden, generator=g)
    a = torch.randn(slots, rank, hidden, generator=g)
    b = torch.randn(slots, hidden + 2, rank, generator=g)  # +2: the adapter's padding differs from the model's
    if four_dim:
        a, b = a.unsqueeze(1), b.unsqueeze(1)

    want, got = torch.zeros(tokens, rank), torch.zeros(tokens, rank)
    ref.bgmv_shrink(x, a, want, idx, 0.5)
    vllm_cpu_lora.bgmv_shrink(x, a, got, idx, 0.5)
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0

    h = torch.randn(tokens, rank, generator=g)
    for add in (False, True):
        base = torch.randn(tokens, hidden, generator=g)
        want, got = base.clone(), base.clone()
        ref.bgmv_expand(h, b, want, idx, add)
        vllm_cpu_lora.bgmv_expand(h, b, got, idx, add)
        torch.testing.assert_close(got, want)

        want, got = base.clone(), base.clone()
        ref.bgmv_expand_slice(h, b[..., :8, :], want, idx, 4, 8, add)
        vllm_cpu_lora.bgmv_expand_slice(h, b[..., :8, :], got, idx, 4, 8, add)
        torch.testing.assert_close(got, want)
        assert not torch.equal(got, base)


def test_plugin_is_registered_and_replaces_the_cpu_ops(monkeypatch):
    require("vllm")
    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("selfreward") == "train.engine.vllm_plugin:register", (
        "entry point missing: reinstall with `pip install -e .`"
    )
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    original = _vllm_ops()  # vLLM's own ops: an engine built earlier in this process may have installed ours
    for module in (ops, punica_cpu):
        for name in vllm_cpu_lora.FASTPATH:
            monkeypatch.setattr(module, name, getattr(original, name))  # restored after the test
    monkeypatch.setenv("SELFREWARD_CPU_LORA_FASTPATH", "0")
    vllm_cpu_lora.install()
    assert punica_cpu.bgmv_shrink is not vllm_cpu_lora.bgmv_shrink
    monkeypatch.delenv("SELFREWARD_CPU_LORA_FASTPATH")
    vllm_cpu_lora.install()
    for name, fn in vllm_cpu_lora.FASTPATH.items():
        assert getattr(punica_cpu, name) is fn and getattr(ops, name) is fn


@pytest.mark.slow
@pytest.mark.integration
def test_engine_processes_die_with_a_killed_parent(tiny_model_dir, tmp_path):
    # SIGKILL (the OOM killer, a hard preemption) gives the run no chance to stop its engine; the plugin's
    # parent-death signal must take the engine core and its worker down too. The CPU default is an in-process engine
    # (`cpu_engine_settings`), so this asks for vLLM's multiprocess engine, which GPU runs and users who set
    # VLLM_ENABLE_V1_MULTIPROCESSING=1 get.
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    require("vllm")
    ready = tmp_path / "ready"
    code = (
        "import sys, time\n"
        "from train.config import SamplingConfig\n"
        "from train.engine import VLLMSampler\n"
        "if __name__ == '__main__':\n"
        f"    s = VLLMSampler({tiny_model_dir!r}, SamplingConfig(max_model_len=256, kv_cache_gib=0.25), 8, 0)\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    time.sleep(600)\n"
    )
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the engine did not start"
            time.sleep(1)
        engine = psutil.Process(proc.pid).children(recursive=True)
        assert engine, "vLLM started no engine process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(engine, timeout=30)
        assert not alive, f"engine processes outlived their killed parent: {[p.name() for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
