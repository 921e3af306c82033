"""The LM head into reused logits buffers (train/engine/vllm_cpu_logits.py), against vLLM's own `_apply_head`.

Real vLLM layers on CPU: a LogitsProcessor and an LM head whose weight vLLM prepacks for oneDNN, as in the engine."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import require
from train.engine import vllm_cpu_logits


def _vllm_apply_head():
    """vLLM's own `_apply_head`, also when an engine built earlier in this process installed ours."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    return vllm_cpu_logits._VLLM.get("_apply_head") or LogitsProcessor._apply_head


def _head(vocab: int = 1000, hidden: int = 64, dtype: torch.dtype = torch.bfloat16, **processor_kwargs):
    """(LogitsProcessor, LM head) as vLLM builds them on CPU: the head's weight prepacked for vLLM's CPU matmul."""
    require("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    head = torch.nn.Module()
    head.weight = torch.nn.Parameter(torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0)).to(dtype))
    head.quant_method = UnquantizedEmbeddingMethod()
    head.tp_size = 1
    head.quant_method.process_weights_after_loading(head)
    with set_current_vllm_config(VllmConfig()):  # as the engine does while it builds the model
        return LogitsProcessor(vocab, **processor_kwargs), head


def _onednn_bf16_matmul() -> bool:
    """Whether oneDNN builds a bf16 matmul on this CPU (AVX-512 BF16 or AMX; an AVX2-only CPU has none)."""
    require("vllm")
    from vllm import _custom_ops as ops

    try:
        ops.create_onednn_mm(torch.zeros(64, 32, dtype=torch.bfloat16).t(), 32)
    except RuntimeError:
        return False
    return True


# Hardware, not an installed component: CI boxes differ in CPU (AMX-capable Xeons and AVX2-only EPYCs both seen).
needs_bf16_matmul = pytest.mark.skipif("not _onednn_bf16_matmul()", reason="no oneDNN bf16 matmul on this CPU")


@needs_bf16_matmul
def test_logits_equal_vllms_in_float32_and_reuse_one_buffer():
    processor, head = _head()
    vllm_apply = _vllm_apply_head()
    g = torch.Generator().manual_seed(1)
    pointers = set()
    for rows in (7, 30, 3):  # rows change every step as sequences finish; more rows than the first reuse it too
        x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
        got = vllm_cpu_logits.apply_head(processor, head, x, None)
        want = vllm_apply(processor, head, x, None)
        assert got.dtype == torch.float32 and want.dtype == torch.bfloat16
        assert torch.equal(got, want.float()), "the same matmul, rounded to bf16 first, as vLLM's"
        pointers.add(got.untyped_storage().data_ptr())
        del got
    assert len(pointers) == 1, "one kept buffer across steps"


@needs_bf16_matmul
def test_logits_still_held_are_never_overwritten():
    processor, head = _head()
    g = torch.Generator().manual_seed(2)
    x1, x2 = (torch.randn(5, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    first = vllm_cpu_logits.apply_head(processor, head, x1, None)
    kept = first.clone()
    second = vllm_cpu_logits.apply_head(processor, head, x2, None)  # `first` still alive: a fresh tensor
    assert torch.equal(first, kept)
    assert second.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
    assert torch.equal(second, _vllm_apply_head()(processor, head, x2, None).float())


def test_buffer_is_allocated_at_capacity_and_handed_out_only_when_idle():
    owner = torch.nn.Module()
    a = vllm_cpu_logits._buffer(owner, "buf", 3, 8, torch.float32, capacity=10)
    assert a.shape == (3, 8) and owner.__dict__["buf"][0].shape == (10, 8)
    assert vllm_cpu_logits._buffer(owner, "buf", 9, 8, torch.float32, capacity=10) is None, "`a` still holds it"
    ptr = a.data_ptr()
    del a
    b = vllm_cpu_logits._buffer(owner, "buf", 9, 8, torch.float32, capacity=10)
    assert b.shape == (9, 8) and b.data_ptr() == ptr
    del b
    c = vllm_cpu_logits._buffer(owner, "buf", 12, 8, torch.float32, capacity=10)  # beyond capacity: grown
    assert c.shape == (12, 8) and owner.__dict__["buf"][0].shape == (12, 8)


@pytest.mark.parametrize("case", ["bias", "soft_cap", "float32"])
def test_anything_but_a_plain_head_keeps_vllms_path(case):
    processor, head = _head(
        dtype=torch.float32 if case == "float32" else torch.bfloat16,
        **({"soft_cap": 30.0} if case == "soft_cap" else {}),
    )
    x = torch.randn(4, 64).to(head.weight.dtype)
    bias = torch.randn(1000).to(head.weight.dtype) if case == "bias" else None
    got = vllm_cpu_logits.apply_head(processor, head, x, bias)
    assert got.dtype == head.weight.dtype, "vLLM's path: logits in the model's dtype"
    assert torch.equal(got, _vllm_apply_head()(processor, head, x, bias))
    assert "selfreward_logits_low" not in head.__dict__


def test_install_routes_vllms_head_through_ours_unless_turned_off(monkeypatch):
    require("vllm")
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    monkeypatch.setattr(LogitsProcessor, "_apply_head", _vllm_apply_head())  # restored after the test
    monkeypatch.setitem(vllm_cpu_logits._VLLM, "_apply_head", _vllm_apply_head())
    monkeypatch.setenv("SELFREWARD_CPU_LOGITS_FASTPATH", "0")
    vllm_cpu_logits.install()
    assert LogitsProcessor._apply_head is not vllm_cpu_logits.apply_head
    monkeypatch.delenv("SELFREWARD_CPU_LOGITS_FASTPATH")
    vllm_cpu_logits.install()
    assert LogitsProcessor._apply_head is vllm_cpu_logits.apply_head


@needs_bf16_matmul
def test_new_weights_in_place_reach_the_logits_after_forget_weights():
    """lora_sync: merge reloads the weights into the same tensors; the packed handle must not outlive them."""
    processor, head = _head()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    before = vllm_cpu_logits.apply_head(processor, head, x, None).clone()
    with torch.no_grad():
        head.weight.data.mul_(2)  # what vLLM's reload does: values copied into the kept storage
    assert torch.equal(vllm_cpu_logits.apply_head(processor, head, x, None), before), "the packed copy is stale"
    model = torch.nn.Sequential(head)
    vllm_cpu_logits.forget_weights(model)
    after = vllm_cpu_logits.apply_head(processor, head, x, None)
    assert torch.equal(after, (x.float() @ head.weight.float().t()).bfloat16().float())
    assert not torch.equal(after, before)


@pytest.mark.parametrize("cpu", ["this", "emulated-avx2"])
def test_a_cpu_without_a_bf16_matmul_keeps_vllms_path(cpu, monkeypatch):
    """On an AVX2-only CPU oneDNN refuses a bf16 matmul ("could not create a primitive descriptor"); vLLM then uses
    torch's linear, and so must the LM head (it raised at every sampling step before). `emulated-avx2` makes the
    handle fail as it does there, on any CPU; `this` runs only on such a CPU."""
    from vllm import _custom_ops as ops

    if cpu == "this" and _onednn_bf16_matmul():
        pytest.skip("this CPU has a oneDNN bf16 matmul; the emulated case covers the fallback")
    processor, head = _head()
    if cpu == "emulated-avx2":

        def refuse(*args, **kwargs):
            raise RuntimeError("could not create a primitive descriptor for the matmul primitive")

        monkeypatch.setattr(ops, "create_onednn_mm", refuse)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    for _ in range(2):  # the refusal is remembered: the second step asks oneDNN nothing
        got = vllm_cpu_logits.apply_head(processor, head, x, None)
        assert got.dtype == torch.bfloat16, "vLLM's path: logits in the model's dtype"
        assert torch.equal(got, _vllm_apply_head()(processor, head, x, None))
    assert head.__dict__["selfreward_onednn"] is None
