"""One builder for the TRL config of every trainer (DPOConfig, GRPOConfig), with one precedence rule:

    shared defaults < the trainer's defaults < the recipe's `trainer:` < what the algorithm owns

What an algorithm owns (its row in the algorithm table, `owned`) is refused in `trainer:` when the recipe is
loaded, so nothing a user writes is silently overwritten here. `model_init_kwargs` is completed after the config
exists, because that is when transformers knows whether ZeRO-3 is on.
"""

from __future__ import annotations

from typing import Any

import torch

from train.errors import NonFiniteLossError
from train.models import bf16_supported, distributed_defaults, trainer_model_kwargs
from train.runtime.progress import progress_enabled


def shared_defaults() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_total_limit": 1,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "bf16": cuda and torch.cuda.is_bf16_supported(),  # TRL defaults bf16=True, even on CPU
        "use_cpu": not cuda,
        "disable_tqdm": not progress_enabled(),  # TRL/transformers' step bar: terminal only, never under CI
        **distributed_defaults(),
    }


def cpu_bf16_autocast() -> dict[str, Any]:
    """`bf16=True` (autocast; the weights stay float32) for a CPU trainer where the CPU has native bf16 matmuls and
    the launch is one process or DDP, with attention in float32 (`CPU_ATTENTION`). Measured on the 2-core box: a
    10-step DPO train phase 160 s -> 132 s (docs/results.md, issue 15). DeepSpeed and FSDP on CPU keep float32: their
    mixed precision is a GPU path."""
    import os

    if torch.cuda.is_available() or not bf16_supported("cpu"):
        return {}
    sharded = any(
        os.environ.get(v, "false").lower() in ("1", "true") for v in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")
    )
    return {} if sharded else {"bf16": True, "model_init_kwargs": {"attn_implementation": register_cpu_attention()}}


# The attention of CPU trainers under bf16 autocast (`cpu_bf16_autocast`), registered with transformers.
CPU_ATTENTION = "selfreward_sdpa_float32"


def sdpa_float32(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention with query, key and value in float32, outside autocast; the output back in the
    query's dtype. CPU autocast runs SDPA in bf16, and torch's bf16 flash-attention backward on CPU is slow: forward +
    backward at the demo's shape ([16, 9, 81, 64], 2 cores) took 23.8 ms in bf16 against 8.7 ms in float32, and
    attention was 21% of a DPO train step (docs/results.md, session 11, "Float32 attention in CPU training"). The inputs are the
    same bf16 values (the projections still run in bf16) and the bf16 kernel already accumulates in float32; what
    changes is rounding inside the kernel (its products take float32 operands instead of bf16 ones)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(dtype), weights


def register_cpu_attention() -> str:
    """Register `sdpa_float32` (and SDPA's mask builder for it) with transformers; its `attn_implementation` name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_ATTENTION, sdpa_float32)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    return CPU_ATTENTION


def score_labelled_positions_on_cpu() -> None:
    """TRL's fused LM head (`add_fused_lm_head`, used by its DPO, SFT and GRPO trainers) scores only the labelled
    positions on CUDA/XPU, and every position (prompt and padding too) elsewhere: on Neuron a batch-dependent row
    count recompiles the kernel (`compact = _use_triton(device)` in trl/trainer/utils.py). An eager CPU has no such
    cost, and there the full-vocabulary log-softmax and its backward over every position were the largest item of a
    train step. We make the same decision true for CPU as well; the per-token log-probs are the same (masked
    positions are zero either way; tests/algorithms/test_dpo.py). Measured: 3 demo DPO steps 28.4 -> 19.5 s
    (docs/results.md, "Scoring only the labelled positions"). Patched in trl.trainer.utils only: TRL's kernel
    module keeps its own `_use_triton` for choosing Triton kernels."""
    import trl.trainer.utils as trl_utils

    triton = trl_utils._use_triton
    if getattr(triton, "selfreward", False):
        return

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or triton(device)

    compact.selfreward = True
    trl_utils._use_triton = compact


def build_trl_config(
    cls: type, defaults: dict[str, Any], overrides: dict[str, Any], owned: dict[str, Any], model_dtype: str
) -> Any:
    """`cls` (a TRL config class) from the layers above; the base model's load kwargs filled in last. Every trainer
    builds its config here, so this is also where `score_labelled_positions_on_cpu` is switched on."""
    score_labelled_positions_on_cpu()
    config = cls(**(shared_defaults() | defaults | overrides | owned))
    # per key: the trainer's defaults (e.g. the CPU attention) stay unless `trainer.model_init_kwargs` names the key
    inits = (trainer_model_kwargs(model_dtype), defaults.get("model_init_kwargs"), config.model_init_kwargs)
    config.model_init_kwargs = {k: v for init in inits for k, v in (init or {}).items()}
    return config


class StopOnNonFiniteLoss:
    """Mixed in before a TRL trainer class: a NaN/inf loss stops the run naming the optimizer step
    (NonFiniteLossError -> `selfreward: stopped: ...`) instead of training on. `loss_name` names the loss."""

    loss_name = "loss"

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        if not torch.isfinite(loss).all():
            step = self.state.global_step + 1  # type: ignore[attr-defined]
            raise NonFiniteLossError(f"{self.loss_name} became {loss.item()} at optimizer step {step}")
        return loss
