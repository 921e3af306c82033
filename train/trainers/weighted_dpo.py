"""One iteration of (weighted) DPO + NLL on a LoRA adapter, as a thin layer over TRL's DPOTrainer.

ScPO (Prasad et al. 2024), per pair:  L = -w·log σ(β·Δ) - α·w·log πθ(y+|x)/|y+|,
Δ = log πθ/π_ref(y+) - log πθ/π_ref(y-). The reference is the model at the start of the iteration.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import create_model_from_path

from train.models import describe_dtypes, load_adapter, load_tokenizer, lora_config
from train.runtime import distributed as dist
from train.trainers.adapters import publish_adapter
from train.trainers.checkpoints import last_complete_checkpoint
from train.trainers.trl_config import StopOnNonFiniteLoss, build_trl_config, cpu_bf16_autocast

WEIGHT = "weight"
log = logging.getLogger("selfreward")


class _WeightCollator:
    """TRL's preference collator drops unknown keys; this one also batches the per-row weight."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        if WEIGHT in examples[0]:
            batch[WEIGHT] = torch.tensor([float(e[WEIGHT]) for e in examples], dtype=torch.float32)
        return batch


class _EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler with each epoch's order drawn from `seed + epoch`, as accelerate's
    SeedableRandomSampler draws the `random` strategy's. transformers' draws from the global RNG, which a resumed run
    restores to the checkpoint's state, not the epoch start's: the resumed epoch would skip the wrong rows."""

    def __init__(self, inner: LengthGroupedSampler, seed: int):
        super().__init__(inner.batch_size, lengths=inner.lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class WeightedDPOTrainer(StopOnNonFiniteLoss, DPOTrainer):
    """DPOTrainer with an optional per-row `weight` column; without one it is exactly TRL's trainer.

    TRL 1.16 reduces every loss term inside `_compute_loss` as `per_sequence_loss.mean()` (and its "sft" term is a
    token mean over the whole batch), with no hook in between. So with weights we let TRL's `_compute_loss` run
    unchanged (forward, reference, metrics), capture the per-token log-probs its forward passes return, and rebuild
    only the loss: `Σ_k loss_weight_k · mean_i(w_i · ℓ_k,i)` where ℓ_sigmoid = -log σ(β·Δ) and ℓ_sft is the chosen
    completion's per-sequence, length-normalised NLL (ScPO), not TRL's batch token mean: with all weights 1 the
    sigmoid term equals TRL's, the NLL term only when chosen completions have equal lengths. Logged rewards/* stay
    TRL's unweighted metrics.
    """

    loss_name = "DPO loss"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.data_collator = _WeightCollator(self.data_collator)
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(self.train_dataset, Dataset):
            self.train_dataset = with_lengths(self.train_dataset, self.args.length_column_name, self.args.max_length)

    def _set_signature_columns_if_needed(self) -> None:
        # `remove_unused_columns` keeps only these: keep the weight (and the lengths the sampler reads) too.
        super()._set_signature_columns_if_needed()
        extra = [WEIGHT, self.args.length_column_name]
        self._signature_columns = [*self._signature_columns, *(c for c in extra if c not in self._signature_columns)]

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            sampler = _EpochSeededLengthGroupedSampler(sampler, self.args.data_seed or self.args.seed)
        return sampler

    def _compute_loss(self, model, inputs, return_outputs):
        weight = inputs.pop(WEIGHT, None)  # must not reach the model's forward
        if weight is None:
            return super()._compute_loss(model, inputs, return_outputs)
        unsupported = set(self.loss_types) - {"sigmoid", "sft"}
        if unsupported or self.f_divergence_type != "reverse_kl" or self.ld_alpha is not None or self.use_weighting:
            raise NotImplementedError(f"per-row weights support loss_type sigmoid/sft only, got {self.loss_types}")
        if self.aux_loss_enabled:
            raise NotImplementedError("per-row weights do not support the MoE auxiliary loss")

        # TRL calls the policy first, then (unless precomputed) the reference; record their per-token log-probs.
        log_probs: list[torch.Tensor] = []

        def record(_module, _args, out):
            if getattr(out, "log_probs", None) is not None:
                log_probs.append(out.log_probs)

        modules = {self.accelerator.unwrap_model(model), self.ref_model} - {None}
        hooks = [m.register_forward_hook(record) for m in modules]
        try:
            result = super()._compute_loss(model, inputs, return_outputs)
        finally:
            for h in hooks:
                h.remove()

        mask = inputs["completion_mask"][:, 1:]
        per_token = log_probs[0][:, -mask.size(1) :] * mask  # same slicing as TRL (prompt-learning PEFT)
        chosen, rejected = per_token.sum(1).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = (log_probs[1][:, -mask.size(1) :] * mask).sum(1).chunk(2)
        w = weight.to(chosen)
        loss = chosen.new_zeros(())
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                per_row = -F.logsigmoid(self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
            else:  # "sft": ScPO's NLL, mean per token of each chosen completion
                per_row = -chosen / mask.chunk(2)[0].sum(1).clamp(min=1)
            loss = loss + loss_weight * (w * per_row).mean()
        return (loss, result[1]) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # A checkpoint holding TRL's "ref" adapter has it in a subfolder; transformers then loads only the subfolder
        # adapters and silently keeps "default" (saved at the root) at its initial weights. Load it explicitly.
        root = Path(resume_from_checkpoint) / "adapter_model.safetensors"
        if isinstance(self.model, PeftModel) and "ref" in self.model.peft_config and root.is_file():
            set_peft_model_state_dict(self.model, load_file(str(root)), adapter_name="default")


def _rows(pairs: list[dict]) -> list[dict[str, Any]]:
    """Conversational rows for TRL; the weight column exists only if some pair has a weight (missing = 1)."""
    weighted = any(WEIGHT in p for p in pairs)
    rows = []
    for p in pairs:
        prompt = p["prompt"] if isinstance(p["prompt"], list) else [{"role": "user", "content": p["prompt"]}]
        row = {"prompt": prompt} | {k: [{"role": "assistant", "content": p[k]}] for k in ("chosen", "rejected")}
        if weighted:
            row[WEIGHT] = float(p.get(WEIGHT, 1.0))
            if not 0 <= row[WEIGHT] < math.inf:
                raise ValueError(f"pair weights must be finite and >= 0, got {row[WEIGHT]}")
        rows.append(row)
    return rows


def _metrics(train_output: Any, log_history: list[dict]) -> dict[str, float]:
    steps = [h for h in log_history if "loss" in h]
    out = {"steps": float(train_output.global_step)}
    if steps:  # last logged step, plus the first margins (≈ 0 when the reference is the starting model)
        out |= {k: v for k, v in steps[-1].items() if k not in ("loss", "step", "epoch")}
        out["rewards/margins_first"] = steps[0].get("rewards/margins", float("nan"))
    out |= train_output.metrics
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


def with_lengths(dataset: Dataset, column: str, max_length: int | None) -> Dataset:
    """`dataset` (TRL-tokenized pairs) with `column`: the padded length a pair brings to a batch, prompt + its longer
    completion (capped at `max_length`). transformers' `LengthGroupedSampler` reads it; without it the sampler looks
    for `input_ids`, which TRL's preference rows do not have, and `train_sampling_strategy: group_by_length` raises."""
    if column in dataset.column_names:
        return dataset

    def length(row: dict[str, Any]) -> dict[str, int]:
        n = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        return {column: min(n, max_length) if max_length else n}

    return dataset.map(length)


def dpo_config(
    output_dir: str,
    *,
    beta: float,
    nll_alpha: float,
    trainer_overrides: dict,
    seed: int = 0,
    trust_remote_code: bool = False,
    report_to: str | list[str] = "none",
    model_dtype: str = "auto",
) -> DPOConfig:
    """The DPOConfig of one iteration: our defaults < the recipe's `trainer:` < what the algorithm owns."""
    owned = {
        "output_dir": str(Path(output_dir) / "checkpoints"),
        "report_to": report_to,
        "seed": seed,
        "trust_remote_code": trust_remote_code,
        "beta": beta,
        "loss_type": ["sigmoid", "sft"] if nll_alpha else ["sigmoid"],  # TRL 1.16 dropped `rpo_alpha`
        "loss_weights": [1.0, nll_alpha] if nll_alpha else [1.0],
    }
    defaults = {
        "save_steps": 20,  # mid-iteration resume after preemption loses <= 20 steps
        "max_length": 512,
        # The reference (base, or the start-of-iteration adapter) is fixed for the whole iteration: its log-probs
        # once, before training, instead of one reference forward per batch per epoch (TRL's option; the weighted
        # loss reads them from the batch). Measured: a 10-step, 2-epoch DPO phase 207 s -> 160 s, same metrics.
        # One process only: TRL 1.16 hands them to the other ranks through a datasets cache file that rank 0 writes,
        # and an in-memory dataset caches in a per-process temp dir, so rank 1 fails to open it.
        "precompute_ref_log_probs": dist.world_size() == 1,
        # Less padding: transformers' LengthGroupedSampler shuffles, then sorts each group of `per_device_train_batch_size
        # × gradient_accumulation_steps` rows (more for datasets over 4 such groups, up to 50) by length, so the
        # micro-batches of one optimizer step split it into longer and shorter rows. For the demo's ~60 pairs the
        # optimizer steps see the same random rows as before. Measured: padded tokens -4% / -12% (iterations 1 / 2),
        # docs/results.md. `trainer.train_sampling_strategy: random` restores TRL's sampler.
        "train_sampling_strategy": "group_by_length",
        **cpu_bf16_autocast(),
    }
    return build_trl_config(DPOConfig, defaults, trainer_overrides, owned, model_dtype)


def train_dpo(
    model_path: str,
    pairs: list[dict],
    output_dir: str,
    *,
    init_adapter: str | None,
    lora: dict,
    **config_kwargs: Any,
) -> dict[str, float]:
    """Train one DPO iteration (resuming from `output_dir/checkpoints`), publish `output_dir/adapter`; float metrics.
    `config_kwargs`: `dpo_config`'s (beta, nll_alpha, trainer_overrides, seed, ...).

    The reference is the model at the start of the iteration: the base model, or `init_adapter`, which is also where
    the trainable adapter starts. Both iterations load the base the same way (`trainer_model_kwargs`).
    """
    if not pairs:
        raise ValueError("no pairs to train on")
    config = dpo_config(output_dir, **config_kwargs)
    seed, trust_remote_code = config.seed, config.trust_remote_code
    set_seed(seed)  # before the LoRA init, which TRL does before Trainer seeds
    peft_config = None
    if init_adapter is None:  # iteration 1: fresh LoRA; TRL's reference = adapters disabled = base model
        model: Any = model_path
        peft_config = lora_config(lora)
    else:  # continue the previous adapter (its own LoRA config); TRL copies it to a frozen "ref" adapter
        init_kwargs = {"trust_remote_code": trust_remote_code, **config.model_init_kwargs}
        config.model_init_kwargs = None  # used here; TRL would warn that it ignores them
        model = load_adapter(
            create_model_from_path(model_path, **init_kwargs),
            init_adapter,
            is_trainable=True,
            # TRL's rule for iteration 1 (`get_peft_model`): LoRA in the base dtype under ZeRO-3, whose coalesced
            # all-gather needs one dtype, and in fp32 (PEFT's autocast) otherwise.
            autocast_adapter_dtype=not is_deepspeed_zero3_enabled(),
        )
    trainer = WeightedDPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(_rows(pairs)),
        peft_config=peft_config,
        processing_class=load_tokenizer(model_path, trust_remote_code),  # the engines' template, base models too
    )
    if trainer.accelerator.is_main_process:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        autocast = ", bf16 autocast" if trainer.args.bf16 else ""
        log.info("training on %s (%s%s)", dist.describe(trainer.accelerator), describe_dtypes(unwrapped), autocast)
    ckpt_dir = trainer.args.output_dir
    last = last_complete_checkpoint(ckpt_dir)
    result = trainer.train(resume_from_checkpoint=last)

    publish_adapter(trainer, Path(output_dir) / "adapter")  # collective: gathers LoRA shards under ZeRO-3
    if trainer.accelerator.is_main_process:
        # The published adapter makes the phase complete; its checkpoints only served mid-phase resume.
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return _metrics(result, trainer.state.log_history)
