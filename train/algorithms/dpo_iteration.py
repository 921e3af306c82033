"""The DPO step that ScPO and Meta-/Self-Rewarding share: train iteration k on its pairs, publish its adapter."""

from __future__ import annotations

from typing import Any

from train.loop import Run


def train_dpo_iteration(run: Run, k: int, pairs: list[dict[str, Any]], beta: float, nll_alpha: float) -> dict[str, Any]:
    """DPO for iteration k: continues from iteration k-1's adapter, which is also the reference (the model at the
    start of the iteration, as in both papers)."""
    from train.trainers.weighted_dpo import train_dpo  # TRL is heavy: import only when a train phase runs

    r = run.recipe
    run.sampler_sleep()
    start = run.adapter(k - 1)
    return train_dpo(
        run.model_path,
        pairs,
        str(run.iter_dir(k)),
        init_adapter=str(start) if start else None,
        lora=r.lora.model_dump(),
        beta=beta,
        nll_alpha=nll_alpha,
        trainer_overrides=r.trainer,
        seed=r.seed + k,
        trust_remote_code=r.trust_remote_code,
        report_to=run.report_to,
        model_dtype=r.model_dtype,
    )
