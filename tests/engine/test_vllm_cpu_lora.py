"""The grouped CPU LoRA ops and the fused `add_lora_linear` compute the product vLLM's ops define (and leave tokens
with no adapter alone, as vLLM's GPU kernels do), and the plugin installs them."""

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
    want[idx < 0] = 0  # vLLM's CPU op would use slot -1 (the last); no adapter means no LoRA product
    vllm_cpu_lora.bgmv_shrink(x, a, got, idx, 0.5)
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0

    h = torch.randn(tokens, rank, generator=g)
    h_ref = h.masked_fill((idx < 0).unsqueeze(1), 0)  # no product for no-adapter tokens (see above)
    for add in (False, True):
        base = torch.randn(tokens, hidden, generator=g)
        want, got = base.clone(), base.clone()
        ref.bgmv_expand(h_ref, b, want, idx, add)
        vllm_cpu_lora.bgmv_expand(h, b, got, idx, add)
        torch.testing.assert_close(got, want)

        want, got = base.clone(), base.clone()
        ref.bgmv_expand_slice(h_ref, b[..., :8, :], want, idx, 4, 8, add)
        vllm_cpu_lora.bgmv_expand_slice(h, b[..., :8, :], got, idx, 4, 8, add)
        torch.testing.assert_close(got, want)
        assert not torch.equal(got, base)


def _wrapper(indices: list[int]):
    """vLLM's CPU punica wrapper with our methods, its metadata set for one step whose tokens use `indices`
    (adapter slots, -1 = none) the way vLLM's model runner sets it (adapter ids 0 = none, mapped to slots)."""
    require("vllm")
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    w = PunicaWrapperCPU(64, 8, device="cpu")
    ids = tuple(i + 1 if i >= 0 else 0 for i in indices)
    vllm_cpu_lora.update_metadata(w, LoRAMapping(ids, ids, is_prefill=True), [1, 2, 3], 3, 1000)
    return w


@pytest.mark.parametrize("indices", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slices", [(24,), (24, 8, 8), (16, 16)], ids=["o", "qkv", "gate-up"])
def test_fused_add_lora_linear_is_the_sum_over_slices(indices, dtype, slices):
    # vLLM's contract: y[t, slice i] += scale * x[t] @ A_i[slot].T @ B_i[slot].T, for tokens with an adapter slot
    g = torch.Generator().manual_seed(1)
    tokens, hidden, rank, slots = len(indices), 24, 4, 3
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    a = tuple(torch.randn(slots, 1, rank, hidden, generator=g).to(dtype) for _ in slices)
    b = tuple(torch.randn(slots, 1, n, rank, generator=g).to(dtype) for n in slices)
    y = torch.randn(tokens, sum(slices), generator=g).to(dtype)

    want = y.double().clone()
    for t, slot in enumerate(indices):
        if slot < 0:
            continue
        parts = [x[t].double() @ ai[slot, 0].double().T @ bi[slot, 0].double().T for ai, bi in zip(a, b)]
        want[t] += 0.5 * torch.cat(parts)
    got = y.clone()
    vllm_cpu_lora.add_lora_linear(_wrapper(indices), got, x, a, b, 0.5, slices)
    tol = dict(rtol=2e-2, atol=0.5) if dtype is torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.double(), want, **tol)
    assert torch.equal(got[torch.tensor(indices) < 0], y[torch.tensor(indices) < 0]), "no adapter, no change"

    # add_inputs=False (vLLM's separate-output path): the LoRA product alone
    alone = y.clone()
    vllm_cpu_lora.add_lora_linear(_wrapper(indices), alone, x, a, b, 0.5, slices, add_inputs=False)
    rows = torch.tensor(indices) >= 0
    torch.testing.assert_close(alone[rows].double(), (want - y.double())[rows], **tol)


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
    for name, fn in vllm_cpu_lora.WRAPPER_METHODS.items():
        assert getattr(punica_cpu.PunicaWrapperCPU, name) is fn


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


def test_layers_the_adapter_leaves_out_get_no_product_until_vllm_writes_the_slot():
    # vLLM zeroes a slot's B for layers the adapter does not cover; ours skips that product and caches each slot's
    # stacked weights, so a new adapter written into the slot in place (as vLLM loads one) must be picked up.
    g = torch.Generator().manual_seed(3)
    w = _wrapper([0, 0, 1, 1])
    x = torch.randn(4, 24, generator=g)
    a = (torch.randn(2, 1, 4, 24, generator=g),)
    b = (torch.zeros(2, 1, 24, 4),)
    b[0][0].copy_(torch.randn(1, 24, 4, generator=g))  # slot 0 live, slot 1 left out
    y = torch.randn(4, 24, generator=g)

    def product(slot: int, t: int) -> torch.Tensor:
        return 0.5 * x[t] @ a[0][slot, 0].T @ b[0][slot, 0].T

    got = y.clone()
    vllm_cpu_lora.add_lora_linear(w, got, x, a, b, 0.5, (24,))
    torch.testing.assert_close(got[:2], y[:2] + torch.stack([product(0, 0), product(0, 1)]))
    assert torch.equal(got[2:], y[2:]), "a left-out layer adds nothing"
    alone = y.clone()
    vllm_cpu_lora.add_lora_linear(w, alone, x, a, b, 0.5, (24,), add_inputs=False)
    assert torch.equal(alone[2:], torch.zeros(2, 24)), "without add_inputs the output is the (zero) product"

    b[0][1].copy_(torch.randn(1, 24, 4, generator=g))  # a new adapter in slot 1, written in place
    again = y.clone()
    vllm_cpu_lora.add_lora_linear(w, again, x, a, b, 0.5, (24,))
    torch.testing.assert_close(again[2:], y[2:] + torch.stack([product(1, 2), product(1, 3)]))


def test_lm_head_without_adapter_weights_gets_no_product(monkeypatch):
    # vLLM wraps the LM head for LoRA whenever LoRA is on; PEFT's all-linear adapters never cover it, so vLLM's slot
    # stays zero and its product ([tokens x vocab]) is skipped. A live slot still goes through vLLM's own path.
    require("vllm")
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    vllms = vllm_cpu_lora._VLLM.get("add_lora_logits") or PunicaWrapperCPU.add_lora_logits
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return vllms(*args, **kwargs)

    monkeypatch.setitem(vllm_cpu_lora._VLLM, "add_lora_logits", spy)
    g = torch.Generator().manual_seed(4)
    w = _wrapper([0, 0, 0])
    x, logits = torch.randn(3, 16, generator=g), torch.randn(3, 100, generator=g)
    a, b = torch.randn(3, 1, 4, 16, generator=g), torch.zeros(3, 1, 100, 4)
    got = logits.clone()
    vllm_cpu_lora.add_lora_logits(w, got, x, a, b, 1.0)
    assert calls == [] and torch.equal(got, logits)
    b[0].copy_(torch.randn(1, 100, 4, generator=g))  # an adapter with LM-head weights
    vllm_cpu_lora.add_lora_logits(w, got, x, a, b, 1.0)
    assert calls == [1]
    torch.testing.assert_close(got, logits + x @ a[0, 0].T @ b[0, 0].T, rtol=1e-4, atol=1e-4)


def test_lora_weights_made_in_inference_mode_are_rebuilt_every_call():
    # tensors made under torch.inference_mode keep no version counter: nothing is cached, a rewrite is still seen
    g = torch.Generator().manual_seed(5)
    w = _wrapper([0, 0])
    with torch.inference_mode():
        x, y = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
        a, b = (torch.randn(1, 1, 2, 8, generator=g),), (torch.randn(1, 1, 8, 2, generator=g),)
        got = y.clone()
        vllm_cpu_lora.add_lora_linear(w, got, x, a, b, 1.0, (8,))
        torch.testing.assert_close(got, y + x @ a[0][0, 0].T @ b[0][0, 0].T)
        b[0].mul_(2)
        again = y.clone()
        vllm_cpu_lora.add_lora_linear(w, again, x, a, b, 1.0, (8,))
        torch.testing.assert_close(again, y + x @ a[0][0, 0].T @ b[0][0, 0].T)
