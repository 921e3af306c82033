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


def _single_slot(indices: torch.Tensor) -> int | None:
    """The slot every token uses when there is one (self-training: the current adapter), else None."""
    if indices.numel() == 1 or bool((indices == indices[0]).all()):
        return int(indices[0])
    return None


def _lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t], computed once per distinct slot instead of per token."""
    if weights.dim() == 4:  # [slots, 1, out, in]
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype=dtype)
    if (slot := _single_slot(indices)) is not None:  # one adapter: no sort, no per-row gather
        return inputs @ weights[slot].to(dtype=dtype).T
    slots = torch.unique(indices)
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
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if add_inputs and (slot := _single_slot(lora_indices_tensor)) is not None:
        # One multiply-add into the output's columns, without a [tokens, slice] temporary and a second pass over
        # them (0.26 against 0.57 ms for 768 tokens x 1,536 columns); one rounding where vLLM's op rounds twice.
        weights = lora_b_weights.squeeze(1) if lora_b_weights.dim() == 4 else lora_b_weights
        target.addmm_(inputs.to(dtype=output_tensor.dtype), weights[slot].to(dtype=output_tensor.dtype).T)
        return
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        target += outputs
    else:
        target[:] = outputs


def _token_slots(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """The adapter slot of every token, from one slot per sequence; just that slot when all sequences share it.

    vLLM's sgmv_* (any step with a prefill in it) expand the per-sequence slots to one per token with
    `repeat_interleave` on every call: 14 calls per layer and step, 0.4 ms each for a 768-sequence step, 28% of a
    LoRA sampling step here (torch.profiler, issue 15). `_lora_matmul` takes a single slot for all rows."""
    if lora_indices_tensor.numel() and bool((lora_indices_tensor == lora_indices_tensor[0]).all()):
        return lora_indices_tensor[:1]
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


# vLLM's sgmv_* signatures; they differ from vLLM's only in how they expand the slots (`_token_slots`).


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _token_slots(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor, _token_slots(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    slots = _token_slots(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, slots, slice_offset, slice_size, add_inputs)


def cpu_fastpath_enabled(env: str) -> bool:
    """A CPU fast path of ours runs unless `env` is "0", on vLLM's CPU platform only."""
    if os.environ.get(env, "1") == "0":
        return False
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()


FASTPATH = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


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
    # punica_cpu imported the names; the package re-exports them.
    for module in (ops, ops_pkg, punica_cpu):
        for name, fn in FASTPATH.items():
            if hasattr(module, name):
                setattr(module, name, fn)
