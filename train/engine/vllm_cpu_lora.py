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

Each slot's stacked A and block-diagonal B are built once per adapter, not in every product: they are cached
until vLLM writes the slot again (it loads an adapter with in-place copies, which bump the tensors' version counters).
A slot whose B is all zero (the adapter has no weights for that layer: vLLM zeroes the slot) is skipped. That
matters most for the LM head: vLLM wraps it for LoRA whenever LoRA is on, and PEFT's `all-linear` never adapts it,
so vLLM-CPU added a zero [tokens x 49,152] product to the logits at every step (a third of a decode step with the
demo's 768 sequences; docs/results.md, session 11, "No LoRA product for layers the adapter leaves out"). Skipping a zero
product changes no output.

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
    self.selfreward_sampler_groups = _token_groups(self.sampler_indices)


def _slot_weights(
    self, a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...], slot: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, Bt) of one adapter slot of one layer, in `dtype`: A = the slices' A matrices stacked, [slices*r, in];
    Bt = their B matrices laid out block-diagonally and transposed, [slices*r, sum(out)]. None when every B of the
    slot is zero (the adapter leaves the layer out). Cached on the wrapper until vLLM writes any of the tensors (a
    new adapter in the slot bumps their version counters)."""
    tensors = (*a_stacked, *b_stacked)
    key = (id(a_stacked[0]), a_stacked[0].data_ptr(), slot, dtype)
    try:
        version = tuple(t._version for t in tensors)
    except RuntimeError:  # inference-mode tensors keep no version counter: build the weights every call
        version = None
    cache = self.__dict__.setdefault("selfreward_slot_cache", {})
    hit = cache.get(key)
    if version is not None and hit is not None and hit[0] == version:
        return hit[1]
    bs = [w[slot].reshape(-1, w.shape[-1]) for w in b_stacked]
    weights = None
    if any(bool(b.any()) for b in bs):
        a = torch.cat([w[slot].reshape(-1, w.shape[-1]) for w in a_stacked]).to(dtype)
        weights = (a, torch.block_diag(*bs).to(dtype).T.contiguous())
    cache[key] = (version, weights)
    return weights


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
        weights = _slot_weights(self, lora_a_stacked, lora_b_stacked, slot, x.dtype)
        if weights is None:  # a zero product: adds nothing, or replaces the rows by zeros (add_inputs=False)
            if not keep:
                out.zero_() if rows is None else out.index_fill_(0, rows, 0)
            continue
        a, bt = weights[0], weights[1].to(out.dtype)
        if rows is None:
            out.addmm_((x @ a.T).to(out.dtype), bt, beta=keep, alpha=scale)
        else:
            delta = (x.index_select(0, rows) @ a.T).to(out.dtype) @ bt
            out.index_copy_(0, rows, out.index_select(0, rows).mul_(keep).add_(delta, alpha=scale))


def add_lora_logits(
    self,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    scale: float,
    *,
    buffer: torch.Tensor | None = None,
    **kwargs,
) -> None:
    """vLLM's `add_lora_logits` (the LM head's LoRA, added to the logits in place), skipped when no slot in use has
    LM-head weights: vLLM adds a zero product for every adapter that leaves the LM head out."""
    groups = getattr(self, "selfreward_sampler_groups", None)
    if groups is not None and all(
        _slot_weights(self, (lora_a_stacked,), (lora_b_stacked,), slot, x.dtype) is None for slot, _ in groups
    ):
        return None
    return _VLLM["add_lora_logits"](self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)


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
WRAPPER_METHODS = {
    "update_metadata": update_metadata,
    "add_lora_linear": add_lora_linear,
    "add_lora_logits": add_lora_logits,
}
_VLLM: dict = {}  # vLLM's own PunicaWrapperCPU methods that ours fall back to, kept by install()


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
    for name in ("add_lora_linear", "add_lora_logits"):
        if getattr(wrapper, name) is not WRAPPER_METHODS[name]:
            _VLLM[name] = getattr(wrapper, name)
    for name, fn in WRAPPER_METHODS.items():
        setattr(wrapper, name, fn)
