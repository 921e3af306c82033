"""SCoRe: training a model to self-correct with two-attempt online RL (Kumar et al., 2024), on a LoRA adapter.

    x = question;  y1 ~ π(·|x);  y2 ~ π(·|x, y1, "There might be an error ... Only output the final solution!")
    (both attempts sampled by the shared vLLM engine with the current adapter, hot-swapped every step)

    evaluate the base model (greedy y1, y2)                                          -> iter_0/eval.json
    Stage I, from a fresh LoRA, for t in 1..stage1_steps:                            -> iter_1/rollouts/step_*.jsonl
        maximise r(y2)  − β2·KL(π‖π_base) on y1 tokens − β1·KL on y2 tokens          -> iter_1/adapter/
    evaluate                                                                         -> iter_1/eval.json
    Stage II, from Stage I's adapter, for t in 1..stage2_steps:                      -> iter_2/rollouts/step_*.jsonl
        maximise r(y1) + r(y2) + α·(r(y2) − r(y1)) [bonus on y2 tokens only] − β1·KL -> iter_2/adapter/
    evaluate                                                                         -> iter_2/eval.json

The reference is always the base model (adapter disabled); the instruction tokens are masked out of the loss.
Each eval reports acc_t1, acc_t2, Δ = acc_t2 − acc_t1 = Δ_i→c − Δ_c→i, edit rate, lengths and KL per attempt; each
`train` phase the same on its training rollouts. Rerunning skips finished phases and resumes a stage from its last
checkpoint (`trainer.save_steps`). The objective and its TRL plumbing live in train/trainers/score_grpo.py.

Under `accelerate launch` every rank trains, and each step every rank rolls out its share of the prompts with its own
engine and the one rollout adapter rank 0 publishes; rank 0 writes the rollout files. Evaluations are sharded the same way (`Run.sharded_sampler`).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from rewards.registry import make_reward
from train.config import ConfigError
from train.data import Item, conversation, load_items
from train.engine import GenParams, Sampler
from train.evaluate import evaluate
from train.loop import ENGINE_KEYS, EVAL_KEYS, PROMPT_KEYS, TRAIN_KEYS, Run, items_digest
from train.runtime import distributed as dist
from train.runtime.artifacts import write_json, write_jsonl
from train.trainers.two_attempts import correction_instruction, correction_metrics, rollout_rows, two_attempt_rollouts

STAGES = (1, 2)  # iter_1 = Stage I, iter_2 = Stage II


def evaluate_attempts(run: Run, k: int, items: list[Item]) -> dict[str, Any]:
    """Single-turn table metrics plus greedy two-attempt self-correction metrics for checkpoint k."""
    r = run.recipe
    adapter = run.adapter(k)
    sampler = run.sharded_sampler  # every rank evaluates its shard; all ranks see every result
    metrics = evaluate(sampler, adapter, items, r)  # also loads the adapter into the engine
    greedy = GenParams(n=1, temperature=0.0, max_tokens=r.eval.max_tokens or r.sampling.max_tokens)
    convs = [conversation(it, r.data) for it in items]
    rollouts = two_attempt_rollouts(sampler, convs, correction_instruction(r.score, r.data), greedy, "eval")
    rows = rollout_rows(rollouts, items, r.data.answer_type)
    metrics |= correction_metrics(rows)
    if adapter is None:
        metrics |= {"kl_t1": 0.0, "kl_t2": 0.0}
    else:
        from train.trainers.score_grpo import rollout_kl

        run.sampler_sleep()  # the KL forward passes need the engine's memory on a GPU
        metrics |= rollout_kl(run.model_path, str(adapter), rows, r.trust_remote_code, model_dtype=r.model_dtype)
    if dist.is_main():
        write_jsonl(run.iter_dir(k) / "eval_rollouts.jsonl", rows)
        write_json(run.iter_dir(k) / "eval.json", metrics)
    return metrics


def shaping_alpha(alpha: float, reward: Any, stage: int) -> float:
    """Stage II's bonus α·(r(y2) − r(y1)) rewards a real correction only when r is grounded (gold answers); with a
    self-judged reward (`self_judged`, e.g. `self_verify`) it would pay the policy for flipping its own verdict."""
    if stage == 2 and alpha and getattr(reward, "self_judged", False):
        logging.getLogger("selfreward").warning(
            "score.alpha=%s ignored: the reward is judged by the policy itself, so Stage II gets no shaping bonus",
            alpha,
        )
        return 0.0
    return alpha


def policy_texts(sampler: Sampler, convs: list, *, n: int, temperature: float, max_tokens: int) -> list[list[str]]:
    """What a reward that needs the model gets: text samples from the engine, with the adapter it holds now."""
    params = GenParams(n=n, temperature=temperature, max_tokens=max_tokens)
    return [[s.text for s in row] for row in sampler.generate(convs, params, desc="reward")]


def train_stage(run: Run, stage: int, steps: int, items: list[Item]) -> dict[str, Any]:
    from train.trainers.score_grpo import train_stage as train_on_rollouts  # TRL is heavy: import when training

    r, cfg = run.recipe, run.recipe.score
    try:
        reward = make_reward(cfg.reward, answer_type=r.data.answer_type, generate=partial(policy_texts, run.sampler))
    except ValueError as e:
        raise ConfigError(f"score.reward: {e}") from None
    rows = [
        {
            "prompt": conversation(it, r.data),
            "answer": None if it.get("answer") is None else str(it["answer"]),
            "id": str(it["id"]),
        }
        for it in items
    ]
    init = run.adapter(stage - 1) if stage == 2 else None  # Stage II continues Stage I (if it ran)
    metrics = train_on_rollouts(
        model_path=run.model_path,
        rows=rows,
        out_dir=run.iter_dir(stage),
        stage=stage,
        steps=steps,
        init_adapter=str(init) if init else None,
        sampler=run.sampler,
        reward=reward,
        instruction=correction_instruction(cfg, r.data),
        gen=GenParams(
            n=1, temperature=r.sampling.temperature, top_p=r.sampling.top_p, max_tokens=r.sampling.max_tokens
        ),
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        alpha=shaping_alpha(cfg.alpha, reward, stage),
        lora=r.lora.model_dump(),
        trainer_overrides=r.trainer,
        answer_type=r.data.answer_type,
        seed=r.seed + stage,
        trust_remote_code=r.trust_remote_code,
        report_to=run.report_to,
        model_dtype=r.model_dtype,
    )
    return {"stage": stage} | metrics


def run_score(run: Run) -> None:
    r, cfg = run.recipe, run.recipe.score
    train_items, eval_items = load_items(r.data, r.seed, r.max_prompts)
    # Room for both attempts plus the correction turn: English runs ~4 characters a token, so a third of its
    # characters bounds its tokens, and 32 covers the chat markup.
    turn = 32 + len(cfg.correction_instruction) // 3
    train_items = run.fit_context(train_items, "train", 2 * r.sampling.max_tokens + turn)
    eval_items = run.fit_context(eval_items, "eval", 2 * (r.eval.max_tokens or r.sampling.max_tokens) + turn)
    eval_on = r.eval.enabled and bool(eval_items)
    eval_inputs = dict(reads=PROMPT_KEYS + ENGINE_KEYS + EVAL_KEYS + ("score.correction_instruction", "model_dtype"),
                       values={"prompts": items_digest(eval_items),
                               "max_tokens": r.eval.max_tokens or r.sampling.max_tokens})  # fmt: skip
    rollout_keys = ("sampling.temperature", "sampling.top_p", "sampling.max_tokens", "score")

    if eval_on:
        run.phase(0, "eval", run.iter_dir(0) / "eval.json", partial(evaluate_attempts, run, 0, eval_items),
                  all_ranks=True, **eval_inputs)  # fmt: skip
        run.write_metrics(0)
    for stage, steps in zip(STAGES, (cfg.stage1_steps, cfg.stage2_steps)):
        if steps == 0:
            continue
        d = run.iter_dir(stage)
        # Every rank trains (DDP/DeepSpeed) and rolls out its share of each step's prompts with its own engine.
        # Stage II starts from Stage I's adapter, when Stage I ran.
        run.phase(stage, "train", d / "adapter", partial(train_stage, run, stage, steps, train_items), all_ranks=True,
                  reads=TRAIN_KEYS + PROMPT_KEYS + ENGINE_KEYS + rollout_keys,
                  values={"prompts": items_digest(train_items), "steps": steps},
                  adapter=1 if stage == 2 and cfg.stage1_steps else None)  # fmt: skip
        if eval_on:
            run.phase(stage, "eval", d / "eval.json", partial(evaluate_attempts, run, stage, eval_items),
                      all_ranks=True, adapter=stage, **eval_inputs)  # fmt: skip
        run.write_metrics(stage)
