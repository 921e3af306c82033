"""SCoRe's objective (Kumar et al., 2024) as pure tensor functions: per-attempt returns with Stage II's shaping
bonus, the REINFORCE baseline, per-token advantages and KL weights. `score_grpo.ScoreGRPOTrainer` calls these; the
tests check them on literal tensors.

Baseline (§5, "on-policy policy gradient (REINFORCE)"): each return minus the mean of its group (the rollouts of one
prompt), with no division by the group's standard deviation. GRPO's std scaling (TRL's default
`scale_rewards="group"`) rescales every group to unit spread, which undoes α: with r(y1) equal across a group, α = 10
and α = 0 would give the same attempt-2 advantages. With the plain baseline the bonus acts at its size."""

from __future__ import annotations

import torch
from trl.trainer.utils import nanstd

from train.trainers.two_attempts import ATTEMPT1, ATTEMPT2


def turn_returns(r1: torch.Tensor, r2: torch.Tensor, stage: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The return each attempt's tokens carry: its own instantaneous reward (Appendix A.2: every run uses γ = 0).

    Stage I (Eq. 3, max r(y2) − β2·KL on attempt 1): attempt 1 has no reward term, its β2 KL holds it near the base;
    attempt 2 carries r(y2).
    Stage II (Eq. 4, max r(y1) + r(y2) − β1·KL, with §5.2's bonus α·(r(y2) − r(y1)) added to the second attempt's
    reward): attempt 1 carries r(y1), attempt 2 carries r(y2) + α·(r(y2) − r(y1))."""
    if stage == 1:
        return torch.zeros_like(r1), r2
    return r1, r2 + alpha * (r2 - r1)


def group_advantages(returns: torch.Tensor, num_generations: int, scale: str = "none") -> torch.Tensor:
    """Return minus its group mean (the rollouts of one prompt), optionally over the std (GRPO's "group"/"batch"
    scaling, not SCoRe's); NaN (unscorable) -> 0."""
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


def sequence_advantages(
    r1: torch.Tensor, r2: torch.Tensor, *, stage: int, alpha: float, num_generations: int, rows: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rollout advantages (attempt 1, attempt 2). `r1`, `r2`: rewards of every process's rollouts, groups of
    `num_generations` consecutive rows (baselines need whole groups); `rows`: this process's slice of them."""
    g1, g2 = turn_returns(r1, r2, stage, alpha)
    return group_advantages(g1, num_generations)[rows], group_advantages(g2, num_generations)[rows]


def score_advantages(
    r1: torch.Tensor,
    r2: torch.Tensor,
    turns: torch.Tensor,
    *,
    stage: int,
    alpha: float,
    num_generations: int,
    rows: slice = slice(None),
) -> torch.Tensor:
    """Per-token advantages (B, T) for this process's rollouts (`turns`), from `sequence_advantages`."""
    adv1, adv2 = sequence_advantages(r1, r2, stage=stage, alpha=alpha, num_generations=num_generations, rows=rows)
    return token_advantages(turns, adv1, adv2)
