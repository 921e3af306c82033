"""SCoRe's objective (Kumar et al., 2024) as pure tensor functions: per-turn returns with Stage II's shaping bonus,
group baselines, per-token advantages, per-token KL weights. `score_grpo.ScoreGRPOTrainer` calls these; the tests
check them on literal tensors."""

from __future__ import annotations

import torch
from trl.trainer.utils import nanstd

from train.trainers.two_attempts import ATTEMPT1, ATTEMPT2


def turn_returns(r1: torch.Tensor, r2: torch.Tensor, stage: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-turn returns. Stage I: only r(y2) is maximised (attempt 1 is held by its β2 KL alone).
    Stage II: r(y1) for attempt 1; r(y2) + α·(r(y2) − r(y1)) for attempt 2 (the bonus is attempt 2's only)."""
    if stage == 1:
        return torch.zeros_like(r1), r2
    return r1, r2 + alpha * (r2 - r1)


def group_advantages(returns: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """Return minus its group mean (the rollouts of one prompt), optionally over the std; NaN (unscorable) -> 0."""
    grouped = returns.view(-1, num_generations)
    adv = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (nanstd(returns) + 1e-4)
    return torch.nan_to_num(adv.reshape(-1), nan=0.0)


def token_advantages(turns: torch.Tensor, adv1: torch.Tensor, adv2: torch.Tensor) -> torch.Tensor:
    """(B, T): attempt-1 tokens get adv1, attempt-2 tokens adv2, instruction and padding 0."""
    zero = torch.zeros_like(adv1)[:, None]
    return torch.where(turns == ATTEMPT1, adv1[:, None], torch.where(turns == ATTEMPT2, adv2[:, None], zero))


def kl_coefficients(turns: torch.Tensor, stage: int, beta1: float, beta2: float) -> torch.Tensor:
    """(B, T) per-token KL weight: Stage I β2 on attempt 1 and β1 on attempt 2; Stage II β1 on both."""
    first = beta2 if stage == 1 else beta1
    coef = torch.zeros(turns.shape, dtype=torch.float32, device=turns.device)
    return coef.masked_fill(turns == ATTEMPT1, first).masked_fill(turns == ATTEMPT2, beta1)


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π || π_ref) per sampled token (non-negative, unbiased; as in TRL's GRPO)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def score_advantages(
    r1: torch.Tensor,
    r2: torch.Tensor,
    turns: torch.Tensor,
    *,
    stage: int,
    alpha: float,
    num_generations: int,
    scale: str = "group",
    rows: slice = slice(None),
) -> torch.Tensor:
    """Per-token advantages. `r1`, `r2`: rewards of every process's rollouts, groups of `num_generations` consecutive
    rows (baselines need whole groups); `turns`: this process's rows, `rows` their slice of the batch."""
    g1, g2 = turn_returns(r1, r2, stage, alpha)
    adv1 = group_advantages(g1, num_generations, scale)[rows]
    adv2 = group_advantages(g2, num_generations, scale)[rows]
    return token_advantages(turns, adv1, adv2)
