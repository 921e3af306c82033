"""A faster LoRA path for vLLM on CPU, loaded into every vLLM process as a vLLM general plugin.

vLLM's CPU LoRA ops (`vllm.lora.ops.torch_ops`) gather a private copy of the LoRA weights for every
token (`weights[indices]`, tokens x rank x hidden) and multiply with a batched einsum. With an
adapter live that made sampling 3-7x slower than the base model here (docs/results.md, Benchmark).
During self-training every token of a batch uses the same adapter, so we group tokens by adapter
slot and do one plain matmul per slot. The result is the same product, and the only change is how it
is computed.

`add_lora_linear` goes one step further for the linear layers (q/k/v, o, gate/up, down): vLLM's CPU wrapper runs
a shrink and an expand per output slice (3 of each for the fused qkv projection), each through the per-token ops
above, with the inputs copied to float32 for every slice. Ours multiplies once by the slices' A matrices stacked
([slices*r, in]) and once by their B matrices laid out block-diagonally ([sum(out), slices*r]), adding into the
layer's output in place (`addmm_`), in the model's dtype. The adapter's rows are found once per step
(`update_metadata`), not in each of the ~400 LoRA products of a step. Measured on the demo's generate workload with
an adapter live: docs/results.md, "Fused LoRA products on CPU".

Tokens with no adapter (index -1) get no LoRA product, as vLLM's GPU kernels do. vLLM's CPU ops would index slot -1,
the last slot; vLLM itself only avoids that when a whole step has no adapter.

Installed by `train.engine.vllm_plugin.register` (a vLLM general plugin, so it runs in the engine process and
in each worker). `SELFREWARD_CPU_LORA_FASTPATH=0` turns it off.
"""

from __future__ import annotations

import os

import torch


def _lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t] (0 where indices[t] = -1), once per distinct slot instead of per
    token."""
    if weights.dim() == 4:  # [slots, 1, out, in]
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype=dtype)
    groups = _token_groups(indices)
    if len(groups) == 1 and groups[0][1] is None:
        return inputs @ weights[groups[0][0]].to(dtype=dtype).T
    out = inputs.new_zeros(inputs.shape[0], weights.shape[1])  # no-adapter rows (-1) add nothing
    for slot, rows in groups:
        out[rows] = inputs[rows] @ weights[slot].to(dtype=dtype).T
    return out


def _token_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(adapter slot, its token rows, or None for all rows) for each slot in use; no-adapter tokens (-1) are left out."""
    slots = torch.unique(indices).tolist()
    if len(slots) == 1:
        return [(slots[0], None)] if slots[0] >= 0 else []
    return [(slot, (indices == slot).nonzero().squeeze(1)) for slot in slots if slot >= 0]


def update_metadata(self, *args, **kwargs) -> None:
    """vLLM's `update_metadata` (once per step; PunicaWrapperCPU inherits it), then the token rows of each slot."""
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

    PunicaWrapperBase.update_metadata(self, *args, **kwargs)
    self.selfreward_groups = _token_groups(self.token_lora_indices)


def add_lora_linear(
    self,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: tuple[torch.Tensor, ...] | None = None,
    **kwargs,
) -> None:
    """y[t, slice i] += scale * (x[t] @ A_i[slot(t)].T) @ B_i[slot(t)].T for every token t with an adapter: vLLM's
    `add_lora_linear` contract (y updated in place), as two matrix products per slot for all slices together."""
    groups = getattr(self, "selfreward_groups", None)
    if groups is None:  # metadata set without our update_metadata (another wrapper instance): vLLM's own path
        return _VLLM["add_lora_linear"](
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )
    x = x.view(-1, x.shape[-1])
    out = y.view(-1, y.shape[-1])[:, : sum(output_slices)]
    keep = 1 if kwargs.get("add_inputs", True) else 0
    for slot, rows in groups:
        a = torch.cat([w[slot].reshape(-1, w.shape[-1]) for w in lora_a_stacked]).to(x.dtype)
        b = torch.block_diag(*[w[slot].reshape(-1, w.shape[-1]) for w in lora_b_stacked]).to(out.dtype)
        if rows is None:
            out.addmm_((x @ a.T).to(out.dtype), b.T, beta=keep, alpha=scale)
        else:
            delta = (x.index_select(0, rows) @ a.T).to(out.dtype) @ b.T
            out.index_copy_(0, rows, out.index_select(0, rows).mul_(keep).add_(delta, alpha=scale))


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
WRAPPER_METHODS = {"update_metadata": update_metadata, "add_lora_linear": add_lora_linear}
_VLLM: dict = {}  # vLLM's own PunicaWrapperCPU.add_lora_linear, kept by install()


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
    wrapper = punica_cpu.PunicaWrapperCPU
    if wrapper.add_lora_linear is not add_lora_linear:
        _VLLM["add_lora_linear"] = wrapper.add_lora_linear
    for name, fn in WRAPPER_METHODS.items():
        setattr(wrapper, name, fn)
