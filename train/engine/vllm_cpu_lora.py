"""A faster LoRA path for vLLM on CPU, loaded into every vLLM process as a vLLM general plugin.

vLLM's CPU LoRA ops (`vllm.lora.ops.torch_ops`) gather a private copy of the LoRA weights for every
token (`weights[indices]`, tokens x rank x hidden) and multiply with a batched einsum. With an
adapter live that made sampling 3-7x slower than the base model here (docs/results.md, Benchmark).
During self-training every token of a batch uses the same adapter, so we group tokens by adapter
slot and do one plain matmul per slot. The result is the same product, and the only change is how it
is computed.

Installed by `train.engine.vllm_plugin.register` (a vLLM general plugin, so it runs in the engine process and
in each worker). `SELFREWARD_CPU_LORA_FASTPATH=0` turns it off.
"""

from __future__ import annotations

import os

import torch


def _lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t], computed once per distinct slot instead of per token."""
    if weights.dim() == 4:  # [slots, 1, out, in]
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype=dtype)
    slots = torch.unique(indices)
    if slots.numel() == 1:
        return inputs @ weights[slots[0]].to(dtype=dtype).T
    out = inputs.new_empty(inputs.shape[0], weights.shape[1])
    for slot in slots.tolist():
        rows = indices == slot
        out[rows] = inputs[rows] @ weights[slot].to(dtype=dtype).T
    return out


# The three functions below keep the signatures and output handling of vLLM's torch_ops versions.


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def cpu_fastpath_enabled(env: str) -> bool:
    """A CPU fast path of ours runs unless `env` is "0", on vLLM's CPU platform only."""
    if os.environ.get(env, "1") == "0":
        return False
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()


FASTPATH = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def install() -> None:
    """Swap vLLM's CPU LoRA ops for the grouped ones (CPU platform only)."""
    if not cpu_fastpath_enabled("SELFREWARD_CPU_LORA_FASTPATH"):
        return
    try:
        import vllm.lora.ops.torch_ops as ops_pkg
        import vllm.lora.ops.torch_ops.lora_ops as ops
        import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    except ImportError:  # another vLLM layout: keep vLLM's own ops
        return
    # The sgmv_* (prefill) ops call bgmv_* through lora_ops' globals; punica_cpu imported the names.
    for module in (ops, ops_pkg, punica_cpu):
        for name, fn in FASTPATH.items():
            if hasattr(module, name):
                setattr(module, name, fn)
