"""Publishing a trainer's LoRA adapter from any launch: one process, DDP, DeepSpeed ZeRO-3, or FSDP2.

Under ZeRO-3 every parameter is sharded across ranks (a local tensor of numel 0), so a plain `save_pretrained`
writes empty LoRA weights, and accelerate's `get_state_dict` gathers the whole model in 16 bit through the DeepSpeed
engine. Under FSDP2 (`fully_shard`) every parameter is a DTensor holding this rank's rows, which safetensors cannot
save, and a full state dict would gather the whole base model too. Only the adapter's few trainable tensors are
needed, so only they are gathered.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from train.runtime.artifacts import commit_dir


def _is_dtensor(t: torch.Tensor) -> bool:
    """A DTensor: FSDP2 turns every parameter it wraps into one (this rank's shard plus the global shape)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """Whole tensors for `params` on every rank inside the block under ZeRO-3 (collective), re-sharded on exit;
    with `modifier_rank`, that rank's in-place changes are kept. A no-op context otherwise.

    FSDP2 needs no context: the model is sharded only by `accelerator.prepare` inside `trainer.train()`, and once it
    is, PEFT's `set_peft_model_state_dict` slices each rank's rows out of the whole tensors it is given
    (`peft.utils.save_and_load._reshard_dtensor_values_for_load`). To read whole tensors, use `adapter_state`."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


@torch.no_grad()
def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights, whole, on CPU. Collective under ZeRO-3 and FSDP2: every rank must call it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in named]):
        # FSDP2: all-gather one tensor at a time, in the same (parameter) order on every rank.
        return {n: (p.full_tensor() if _is_dtensor(p) else p).detach().to("cpu", copy=True) for n, p in named}


def publish_adapter(trainer: Any, dest: Path) -> None:
    """Write the trainer's "default" adapter to `dest` atomically, once (rank 0). Every rank must call it; each
    returns after `dest` is complete. `commit_dir` fsyncs the saved files before the rename, so a power loss never
    leaves `dest` naming a truncated `adapter_model.safetensors` (and `Run.adapter` refuses one that is)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = adapter_state(model)
    if trainer.accelerator.is_main_process:
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # selected_adapters: DPO's frozen "ref" copy would otherwise be saved in a subfolder too.
        model.save_pretrained(str(tmp), state_dict=state, selected_adapters=["default"], safe_serialization=True)
        commit_dir(tmp, dest)
    trainer.accelerator.wait_for_everyone()
