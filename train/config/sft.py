"""The `sft:` recipe section: the optional SFT seed phase of Self-/Meta-Rewarding (train/algorithms/sft_seed.py).

Self-Rewarding (Yuan et al., 2024, arXiv 2401.10020, §2.1-2.2, §3.1) starts its iterations from M1 = SFT(M0) on two
seed sets: instruction following (IFT: Open Assistant's first-turn, rank-0 human answers) and evaluation (EFT: the
judge prompt of Figure 2 for an (instruction, response) pair → a chain-of-thought judgement ending in its score).
Meta-Rewarding (Wu et al., 2024, arXiv 2407.19594, §3.1) starts from Llama-3-8B-Instruct fine-tuned on that EFT set.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from train.config.base import Section

# What the SFT phase takes from the recipe's `trainer:` (a DPOConfig mapping): precision and memory only. Learning
# rate, schedule, batch and length are the SFT phase's own (`sft.*`), never the DPO iterations'.
SFT_TRAINER_KEYS = ("bf16", "fp16", "gradient_checkpointing", "gradient_checkpointing_kwargs")


class SftConfig(Section):
    enabled: bool = Field(
        False,
        description="Run the SFT seed phase (`iter_0/adapter`, phase `sft`) before iteration 1, which then starts "
        "from it: M1 = SFT(M0) (Self-Rewarding §2.4, §3.1; Meta-Rewarding §3.1). Self-/Meta-Rewarding only.",
    )
    ift_file: str | None = Field(
        None,
        description="JSONL of instruction-following seed examples, rows `prompt`, `response` (Self-Rewarding §3.1: "
        "Open Assistant's first-turn English answers of human rank 0). The prompt is shown as the actor sees it "
        "(`data.instruction`, `data.system_prompt`). Relative: as `data.train_file`.",
    )
    eft_file: str | None = Field(
        None,
        description="JSONL of evaluation seed examples, rows `prompt`, `response`, `judgement`: trained as the judge "
        "prompt (`rewards/judge.py`, Self-Rewarding Fig. 2) → `judgement`, which must end in a score the judge "
        "parser reads (`Score: 4`). Relative: as `data.train_file`.",
    )
    learning_rate: float = Field(
        1.0e-4, gt=0.0, le=1.0, description="Peak learning rate (LoRA; Self-Rewarding §3.1's full SFT: 5.5e-6)."
    )
    min_lr_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Cosine decay ends at this fraction of the peak (Self-Rewarding §3.1: 5.5e-6 → 1.1e-6 = 0.2).",
    )
    num_train_epochs: float = Field(1.0, gt=0.0, le=1000.0, description="Epochs over the IFT + EFT examples.")
    max_steps: int = Field(-1, ge=-1, le=10_000_000, description="Optimizer steps; -1 = `num_train_epochs` decides.")
    per_device_train_batch_size: int = Field(2, ge=1, le=65_536, description="Examples per process per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65_536, description="Micro-batches per optimizer step.")
    max_length: int = Field(
        2048, ge=16, le=2**21, description="Tokens per example (prompt + target); longer ones are truncated."
    )

    @model_validator(mode="after")
    def _has_data(self) -> SftConfig:
        if self.enabled and not (self.ift_file or self.eft_file):
            raise ValueError("sft.enabled needs sft.ift_file or sft.eft_file (or both)")
        return self
