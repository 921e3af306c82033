"""Supervised fine-tuning of a fresh LoRA adapter, as a thin layer over TRL's SFTTrainer: the seed model M1 = SFT(M0)
of Self-Rewarding (Yuan et al., 2024, §2.1-2.2, §3.1) and Meta-Rewarding (Wu et al., 2024, §3.1).

Rows are TRL's conversational prompt-completion format (`prompt`: messages, `completion`: one assistant message), so
TRL computes the loss on the completion tokens only (`completion_only_loss`), as Self-Rewarding §3.1 does ("we only
calculate the loss on target tokens instead of the full sequence"). The adapter has the recipe's LoRA config, the
one every DPO iteration continues, and is published like theirs (`adapters.publish_adapter`: any launch).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from train.config.sft import SFT_TRAINER_KEYS
from train.models import describe_dtypes, load_tokenizer, lora_config
from train.runtime import distributed as dist
from train.trainers.adapters import publish_adapter
from train.trainers.checkpoints import last_complete_checkpoint
from train.trainers.trl_config import StopOnNonFiniteLoss, build_trl_config, cpu_bf16_autocast

log = logging.getLogger("selfreward")


class _FiniteSFTTrainer(StopOnNonFiniteLoss, SFTTrainer):
    loss_name = "SFT loss"


def sft_config(
    output_dir: str,
    *,
    hyper: dict[str, Any],
    trainer_overrides: dict[str, Any],
    seed: int = 0,
    trust_remote_code: bool = False,
    report_to: str | list[str] = "none",
    model_dtype: str = "auto",
) -> SFTConfig:
    """The SFTConfig of the seed phase: our defaults < the recipe's `trainer:` precision/memory keys < `sft.*`.
    `hyper`: the `sft` section (learning_rate, min_lr_rate, num_train_epochs, max_steps, batch sizes, max_length)."""
    owned = {
        "output_dir": str(Path(output_dir) / "checkpoints"),
        "report_to": report_to,
        "seed": seed,
        "trust_remote_code": trust_remote_code,
        "learning_rate": hyper["learning_rate"],
        # Self-Rewarding §3.1: cosine decay to a fraction of the peak (5.5e-6 -> 1.1e-6); 0 = plain cosine to zero.
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": hyper["min_lr_rate"]},
        "num_train_epochs": hyper["num_train_epochs"],
        "max_steps": hyper["max_steps"],
        "per_device_train_batch_size": hyper["per_device_train_batch_size"],
        "gradient_accumulation_steps": hyper["gradient_accumulation_steps"],
        "max_length": hyper["max_length"],
        "completion_only_loss": True,  # loss on the target tokens only (Self-Rewarding §3.1)
        "packing": False,  # one example per row: packing would need FlashAttention's padding-free batches
    }
    defaults = {"save_steps": 20, **cpu_bf16_autocast()}  # mid-phase resume loses <= 20 steps
    overrides = {k: v for k, v in trainer_overrides.items() if k in SFT_TRAINER_KEYS}
    return build_trl_config(SFTConfig, defaults, overrides, owned, model_dtype)


def train_sft(
    model_path: str, rows: list[dict[str, Any]], output_dir: str, *, lora: dict[str, Any], **config_kwargs: Any
) -> dict[str, float]:
    """Train a fresh LoRA adapter on `rows` (resuming from `output_dir/checkpoints`), publish `output_dir/adapter`;
    float metrics. Every rank calls it (TRL shards the batches); rank 0 writes. `config_kwargs`: `sft_config`'s."""
    if not rows:
        raise ValueError("no SFT examples to train on")
    config = sft_config(output_dir, **config_kwargs)
    set_seed(config.seed)  # before the LoRA init
    trainer = _FiniteSFTTrainer(
        model=model_path,
        args=config,
        train_dataset=Dataset.from_list(rows),
        peft_config=lora_config(lora),
        processing_class=load_tokenizer(model_path, config.trust_remote_code),  # the engines' chat template
    )
    if trainer.accelerator.is_main_process:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        autocast = ", bf16 autocast" if trainer.args.bf16 else ""
        log.info("SFT on %s (%s%s)", dist.describe(trainer.accelerator), describe_dtypes(unwrapped), autocast)
    ckpt_dir = trainer.args.output_dir
    result = trainer.train(resume_from_checkpoint=last_complete_checkpoint(ckpt_dir))

    publish_adapter(trainer, Path(output_dir) / "adapter")  # collective under ZeRO-3 / FSDP2
    if trainer.accelerator.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the published adapter completes the phase
    trainer.accelerator.wait_for_everyone()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {"steps": float(result.global_step), "examples": float(len(rows))}
    if losses:
        out |= {"loss_first": float(losses[0]), "loss_last": float(losses[-1])}
    out |= {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return out
