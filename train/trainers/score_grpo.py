"""SCoRe's objective as a thin layer over TRL's GRPOTrainer (trl 1.16), with rollouts from our own engine.

Why GRPO, and where it is bent (decided after reading trl/trainer/grpo_trainer.py):
- Rollouts: `rollout_func` (experimental) receives the batch's prompts (already repeated `num_generations` times)
  and must return `prompt_ids`, `completion_ids`, `logprobs` (None is accepted: TRL's importance-sampling
  correction only runs with `use_vllm`), plus optional `env_mask` (0 = injected tokens, multiplied into the loss
  mask) and extra fields that TRL forwards to the reward functions. It works with `use_vllm=False`, so TRL starts
  no engine of its own: each rollout first hot-swaps the trainer's current LoRA into the shared `run.sampler`
  (save adapter -> `sampler.set_adapter`, a new vLLM LoRARequest; no weight merging).
- Policy term: with one generation per optimizer step and `num_iterations=1`, GRPO's importance ratio is exactly 1,
  so its clipped surrogate is REINFORCE with a group baseline: the on-policy policy gradient of the paper.
- Rewards: TRL's reward functions score one completion each; we register two (attempt 1 and attempt 2, wrapping the
  recipe's reward) so TRL computes and logs r(y1) and r(y2). `_calculate_rewards` is wrapped only to keep that matrix.
- Advantages: TRL's are one scalar per completion, but its `_compute_loss` accepts (B, T) advantages, so after TRL's
  scoring we replace them with per-token ones (train/trainers/score_objective.py): each attempt's tokens carry the
  return that attempt influences minus its group mean, with no std scaling (REINFORCE; GRPO's std scaling would
  cancel α), so the Stage II bonus α·(r(y2) − r(y1)) acts at its size on attempt-2 tokens. Every rollout row in
  `rollouts/step_*.jsonl` records the `advantage1`/`advantage2` the loss used.
- KL: TRL adds `beta * KL` with one scalar β; Stage I needs β2 on attempt 1 and β1 on attempt 2. TRL's KL is turned
  off (beta=0) and `_compute_loss` adds Σ β_t·KL_t with TRL's own reduction for the loss type, from the policy
  log-probs of TRL's forward (captured, not recomputed) and reference log-probs computed once per rollout with the
  LoRA adapter disabled (= the base model, the paper's reference). This is the narrowest override TRL allows.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import use_adapter

from train.engine import GenParams, Sampler
from train.models import describe_dtypes, load_tokenizer, lora_config
from train.runtime import distributed as dist
from train.runtime.artifacts import write_jsonl
from train.trainers.adapters import gathered, publish_adapter
from train.trainers.score_objective import kl_coefficients, per_token_kl, sequence_advantages, token_advantages
from train.trainers.trl_config import StopOnNonFiniteLoss, build_trl_config
from train.trainers.two_attempts import ATTEMPT1, ATTEMPT2, correction_metrics, rollout_rows, two_attempt_rollouts

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dapo")
log = logging.getLogger("selfreward")


# ---- the rollout function handed to TRL -----------------------------------------------------------------------------


class TwoAttemptRollout:
    """TRL `rollout_func`: hot-swap the current adapter into the engine, then roll out both attempts."""

    def __init__(self, sampler: Sampler, instruction: str, params: GenParams, adapter_dir: Path):
        self.sampler, self.instruction, self.params, self.adapter_dir = sampler, instruction, params, adapter_dir
        self.last: list = []

    def __call__(self, prompts: list, trainer: GRPOTrainer) -> dict[str, Any]:
        # Every rank calls this in step: rank 0 writes the adapter once, each rank's engine loads it and rolls out
        # the rank's own prompts (TRL's sampler shards them).
        publish_adapter(trainer, self.adapter_dir)
        self.sampler.set_adapter(str(self.adapter_dir))
        self.last = two_attempt_rollouts(
            self.sampler, prompts, self.instruction, self.params, desc=f"step {trainer.state.global_step + 1}"
        )
        return {
            "prompt_ids": [r.prompt_ids for r in self.last],
            "completion_ids": [r.completion_ids for r in self.last],
            "logprobs": None,
            "env_mask": [r.env_mask for r in self.last],
            "turns": [r.turns for r in self.last],
            "attempt1": [r.attempt1 for r in self.last],
            "attempt2": [r.attempt2 for r in self.last],
        }


def turn_reward(reward: Any, turn: int) -> Any:
    """TRL reward func scoring one attempt (TRL's `completions` hold the whole y1 + instruction + y2)."""

    def fn(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        texts = kwargs[f"attempt{turn}"]
        return reward(prompts=prompts, completions=[[{"role": "assistant", "content": t}] for t in texts], **kwargs)

    fn.__name__ = f"attempt{turn}"
    return fn


# ---- the trainer ----------------------------------------------------------------------------------------------------


class ScoreGRPOTrainer(StopOnNonFiniteLoss, GRPOTrainer):
    loss_name = "the SCoRe loss (policy term + per-attempt KL)"

    def __init__(
        self,
        *args: Any,
        stage: int,
        beta1: float,
        beta2: float,
        alpha: float,
        answer_type: str = "number",
        rollout_dir: Path | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if self.beta != 0.0:
            raise ValueError("SCoRe owns the KL term (score.beta1/beta2); GRPOConfig.beta must stay 0")
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(f"SCoRe supports trainer.loss_type in {SUPPORTED_LOSS_TYPES}, got {self.loss_type}")
        self.stage, self.beta1, self.beta2, self.alpha = stage, beta1, beta2, alpha
        self.answer_type, self.rollout_dir = answer_type, rollout_dir
        self._turn_rewards: torch.Tensor | None = None
        self._policy_logps: torch.Tensor | None = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._turn_rewards = rewards  # (B of all processes, 2): r(y1), r(y2)
        return rewards

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if torch.is_grad_enabled():  # the policy forward inside `_compute_loss`
            self._policy_logps = out[0]
        return out

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)  # rollout_func, rewards, TRL's scalar advantages
        width = out["completion_ids"].size(1)
        turns = torch.tensor(
            [x["turns"] + [0] * (width - len(x["turns"])) for x in inputs], device=self.accelerator.device
        )
        r1, r2 = self._turn_rewards[:, 0], self._turn_rewards[:, 1]
        mine = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        adv1, adv2 = sequence_advantages(
            r1, r2, stage=self.stage, alpha=self.alpha, num_generations=self.num_generations, rows=mine
        )
        out["advantages"] = token_advantages(turns, adv1, adv2)  # replaces TRL's scalar, std-scaled ones
        out["kl_coef"] = kl_coefficients(turns, self.stage, self.beta1, self.beta2)
        out["turns"] = turns
        # Sleep before any forward pass of the trainer: the reference log-probs below need the memory the engine
        # holds (no-op on CPU). The engine wakes at the next rollout, after `free_accelerator_memory`.
        self.rollout_func.sampler.sleep()
        out["ref_logps"] = self._reference_logps(out)
        self._record_rollouts(inputs, r1[mine], r2[mine], adv1, adv2)
        return out

    @torch.no_grad()
    def _reference_logps(self, out: dict[str, Any]) -> torch.Tensor:
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        with use_adapter(self.accelerator.unwrap_model(self.model), adapter_name=None):  # adapters off = base model
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, mask, out["completion_ids"].size(1), batch_size=self.args.per_device_train_batch_size
            )
        return logps

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)  # GRPO/REINFORCE term on our per-token advantages, no KL
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        kl = per_token_kl(self._policy_logps, inputs["ref_logps"])
        loss = loss + self._reduce(inputs["kl_coef"] * kl, mask, inputs)
        mode = "train" if self.model.training else "eval"
        for name, turn in (("kl_t1", ATTEMPT1), ("kl_t2", ATTEMPT2)):
            sel = mask.bool() & (inputs["turns"] == turn)
            if sel.any():
                self._metrics[mode][f"score/{name}"].append(kl[sel].mean().item())
        return loss

    def _reduce(self, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's reduction of `per_token_loss` for `self.loss_type`, so the KL term scales like the policy term."""
        train = self.model.training
        accumulation = self.current_gradient_accumulation_steps if train else 1.0
        if self.loss_type == "grpo":
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes  # dapo
        if train:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return (per_token * mask).sum() / normalizer

    def _record_rollouts(self, inputs: list[dict[str, Any]], r1: torch.Tensor, r2: torch.Tensor,
                         adv1: torch.Tensor, adv2: torch.Tensor) -> None:  # fmt: skip
        rows = rollout_rows(self.rollout_func.last, inputs, self.answer_type)
        step = self.state.global_step + 1
        for row, a, b, x, y in zip(rows, r1.tolist(), r2.tolist(), adv1.tolist(), adv2.tolist()):
            row.update(
                {
                    "step": step,
                    "stage": self.stage,
                    "reward1": _num(a),
                    "reward2": _num(b),
                    "advantage1": x,
                    "advantage2": y,
                }
            )  # what the loss used for each attempt's tokens
        if self.accelerator.num_processes > 1:  # every rank's rollouts: one file, metrics over the whole batch
            rows = gather_object(rows)
        m = correction_metrics(rows)
        for key in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "edit_rate", "len_t1", "len_t2"):
            self._metrics["train"][f"score/{key}"].append(float(m[key]))
        if self.rollout_dir is not None and self.accelerator.is_main_process:
            write_jsonl(self.rollout_dir / f"step_{step:05d}.jsonl", rows)


def _num(x: float) -> float | None:
    return None if x != x else x  # NaN (unscorable) -> null in JSON


# ---- one stage ------------------------------------------------------------------------------------------------------


def build_trainer(
    *,
    model_path: str,
    rows: list[dict[str, Any]],
    out_dir: Path,
    stage: int,
    steps: int,
    init_adapter: str | None,
    sampler: Sampler,
    reward: Any,
    instruction: str,
    gen: GenParams,
    beta1: float,
    beta2: float,
    alpha: float,
    lora: dict[str, Any],
    trainer_overrides: dict[str, Any],
    answer_type: str = "number",
    seed: int = 0,
    trust_remote_code: bool = False,
    report_to: str | list[str] = "none",
    model_dtype: str = "auto",
) -> ScoreGRPOTrainer:
    """One stage's trainer on a fresh LoRA (so adapters-off = base model = the reference in both stages)."""
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    owned = {
        "output_dir": str(out_dir / "checkpoints"),
        "report_to": report_to,
        "seed": seed,
        "max_steps": steps,
        "beta": 0.0,  # the KL is SCoRe's (per token), see ScoreGRPOTrainer._compute_loss
        "use_vllm": False,  # rollouts come from the shared engine through rollout_func
        "temperature": gen.temperature or 1.0,  # TRL scales logits by it when scoring the sampled tokens
        "trust_remote_code": trust_remote_code,
    }
    defaults = {
        "learning_rate": 5e-6,  # paper (MATH)
        "save_steps": 10,
        "max_completion_length": 2 * gen.max_tokens,  # informational: the rollout decides lengths
    }
    config = build_trl_config(GRPOConfig, defaults, trainer_overrides, owned, model_dtype)
    per_step = config.generation_batch_size // config.num_generations  # prompts per optimizer step
    if rows and len(rows) < per_step:  # smoke runs (max_prompts): repeat prompts rather than yield no batch
        rows = rows * -(-per_step // len(rows))
    peft_config = lora_config(lora)
    trainer = ScoreGRPOTrainer(
        model=model_path,
        reward_funcs=[turn_reward(reward, 1), turn_reward(reward, 2)],
        args=config,
        processing_class=load_tokenizer(model_path, trust_remote_code),  # the engines' template, base models too
        train_dataset=Dataset.from_list(rows),
        peft_config=peft_config,
        rollout_func=TwoAttemptRollout(sampler, instruction, gen, out_dir / "rollout_adapter"),
        stage=stage,
        beta1=beta1,
        beta2=beta2,
        alpha=alpha,
        answer_type=answer_type,
        rollout_dir=out_dir / "rollouts",
    )
    if init_adapter is not None:  # Stage II starts from Stage I's weights (not as its reference)
        weights = load_file(str(Path(init_adapter) / "adapter_model.safetensors"))
        with gathered([p for p in trainer.model.parameters() if p.requires_grad], modifier_rank=0):  # ZeRO-3 shards
            loaded = set_peft_model_state_dict(trainer.model, weights)
        if getattr(loaded, "unexpected_keys", None):
            raise RuntimeError(f"adapter {init_adapter} does not match the LoRA config: {loaded.unexpected_keys[:3]}")
    return trainer


def train_stage(*, out_dir: Path, **kwargs: Any) -> dict[str, float]:
    """Run one stage (`build_trainer` arguments) and publish `out_dir/adapter`; resumes from its last checkpoint."""
    from train.trainers.checkpoints import last_complete_checkpoint

    trainer = build_trainer(out_dir=out_dir, **kwargs)
    if trainer.accelerator.is_main_process:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        log.info("training on %s (%s)", dist.describe(trainer.accelerator), describe_dtypes(unwrapped))
    last = last_complete_checkpoint(trainer.args.output_dir)  # a kill mid-save leaves a torn one
    result = trainer.train(resume_from_checkpoint=last)

    publish_adapter(trainer, out_dir / "adapter")
    if trainer.accelerator.is_main_process:
        shutil.rmtree(out_dir / "rollout_adapter", ignore_errors=True)
    return stage_metrics(result, trainer.state.log_history)


def stage_metrics(train_output: Any, log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the stage's logged steps (rewards, accuracies, KL per attempt), plus timing."""
    steps = [h for h in log_history if "loss" in h and "train_runtime" not in h]
    keys = sorted({k for h in steps for k, v in h.items() if isinstance(v, (int, float))} - {"step", "epoch"})
    out: dict[str, float] = {"steps": float(train_output.global_step)}
    for k in keys:
        vals = [h[k] for h in steps if isinstance(h.get(k), (int, float))]
        out[k] = sum(vals) / len(vals)
    out |= {k: float(v) for k, v in train_output.metrics.items() if isinstance(v, (int, float))}
    if train_output.global_step:
        out["seconds_per_step"] = out.get("train_runtime", 0.0) / train_output.global_step
    return out


# ---- evaluation: KL per attempt on held-out rollouts ----------------------------------------------------------------


def rollout_kl(
    model_path: str,
    adapter: str,
    rows: list[dict[str, Any]],
    trust_remote_code: bool = False,
    batch_size: int = 8,
    model_dtype: str = "auto",
) -> dict[str, float]:
    """Mean per-token KL(π_adapter || π_base) (k3 estimator, T=1) on attempt-1 and attempt-2 tokens of `rows`.
    Under `accelerate launch` each rank scores its shard of the rows on its own device (collective)."""
    mine = _kl_sums(model_path, adapter, dist.shard(rows), trust_remote_code, batch_size, model_dtype)
    parts = dist.gather_rows([mine])  # one (sums, counts) per rank
    sums = {turn: sum(p[0][turn] for p in parts if p) for turn in (ATTEMPT1, ATTEMPT2)}
    counts = {turn: sum(p[1][turn] for p in parts if p) for turn in (ATTEMPT1, ATTEMPT2)}
    return {f"kl_t{turn}": sums[turn] / max(counts[turn], 1) for turn in (ATTEMPT1, ATTEMPT2)}


@torch.no_grad()
def _kl_sums(model_path: str, adapter: str, rows: list[dict[str, Any]], trust_remote_code: bool, batch_size: int,
             model_dtype: str) -> tuple[dict[int, float], dict[int, int]] | None:  # fmt: skip
    """Summed KL and token counts per attempt over `rows`; None for an empty shard (no model is loaded)."""
    if not rows:
        return None
    from train.models import load_adapter, load_causal_lm, resolve_dtype

    device = f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu"
    base = load_causal_lm(model_path, trust_remote_code, resolve_dtype(model_dtype, device.split(":")[0]))
    model = load_adapter(base, adapter).eval().to(device)
    sums, counts = {ATTEMPT1: 0.0, ATTEMPT2: 0.0}, {ATTEMPT1: 0, ATTEMPT2: 0}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        seqs = [r["prompt_ids"] + r["completion_ids"] for r in batch]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        turns = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            p = len(r["prompt_ids"])
            turns[i, p : p + len(r["turns"])] = torch.tensor(r["turns"], device=device)
        policy = _token_logps(model(input_ids=ids, attention_mask=attn).logits, ids)
        with model.disable_adapter():
            ref = _token_logps(model(input_ids=ids, attention_mask=attn).logits, ids)
        kl, t = per_token_kl(policy, ref), turns[:, 1:]
        for turn in (ATTEMPT1, ATTEMPT2):
            sums[turn] += kl[t == turn].sum().item()
            counts[turn] += int((t == turn).sum())
    return sums, counts


def _token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log π(ids[t] | ids[:t]) for t >= 1."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
