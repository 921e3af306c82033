"""Pair selection for Self-Rewarding (Yuan et al., 2024) and Meta-Rewarding (Wu et al., 2024): pure numerics.

Actor pairs: best vs worst mean judge score, optionally length-controlled (Meta-Rewarding §2.1).
Judge pairs (§2.2): the meta-judge compares the scored judgements of one response in both orders; wins are
debiased for position, turned into Elo ratings, and the best- vs worst-rated judgement form a pair, which is dropped
when the chosen judgement is over-long.

What the paper does NOT do, though NeMo-Aligner's unmerged Meta-Rewarding trainer does (issue 14, item 4): require
the two judgements of a pair to differ in score, strip "Score: X" from judgements before meta-judging, or cap the
share of judge pairs in a batch (`meta_judge_pcnt`) and balance them by chosen score. The paper meta-judges
same-score judgement pairs (Table 5, "Meta-Judge Biases", measures its positional bias on exactly those), shows it the
judgements as written (Figure 2; Table 5's score bias is its preference for the higher-scoring judgement), and makes at
most one judge pair per prompt (one response per prompt is meta-judged). The pipeline follows the paper on all three.
"""

from __future__ import annotations

import numpy as np

from rewards.schedule import per_iteration

# Float slack for score windows and Elo ties: mean scores are averages of a few small numbers.
_EPS = 1e-9
_ELO_TIE = 1e-6
# L2 on the ratings: a judgement that wins every battle has an infinite maximum-likelihood rating without it.
_ELO_L2 = 1e-3


def position_debias_weights(wins_first: int, wins_second: int) -> tuple[float, float]:
    """(ω1, ω2) of Meta-Rewarding §2.2: ω1 = win_2nd / total, ω2 = win_1st / total.

    ω1 weights wins obtained by the judgement shown in the FIRST position ("Judgement A"), ω2 wins in the
    second position. A meta-judge that favours the first slot has many first-slot wins, so each of them counts
    less. (0.5, 0.5) when there are no wins at all.
    """
    if wins_first < 0 or wins_second < 0:
        raise ValueError(f"win counts must be >= 0, got {wins_first}, {wins_second}")
    total = wins_first + wins_second
    if total == 0:
        return 0.5, 0.5
    return wins_second / total, wins_first / total


def battle_matrix(n: int, outcomes: list[tuple[int, int, str | None]]) -> np.ndarray:
    """B[m][k]: position-weighted wins of judgement m over k (Meta-Rewarding §2.2).

    Each outcome is (m, k, winner): m was shown first ("Judgement A"), k second, winner in {"A", "B", None}.
    ω1, ω2 come from the first/second-position win counts over all outcomes given; None verdicts are ignored.
    §2.2 does not say over which battles win_1st and win_2nd are counted; the reading taken (the caller,
    train/algorithms/meta_rewarding.py) passes one prompt's battles, the N·(N−1) ordered comparisons that build
    that prompt's B, so ω corrects the position bias the meta-judge showed on those judgements.
    """
    for m, k, _ in outcomes:
        if not (0 <= m < n and 0 <= k < n) or m == k:
            raise ValueError(f"bad battle ({m}, {k}) for {n} judgements")
    verdicts = [w for _, _, w in outcomes]
    w1, w2 = position_debias_weights(verdicts.count("A"), verdicts.count("B"))
    b = np.zeros((n, n), dtype=np.float64)
    for m, k, winner in outcomes:
        if winner == "A":
            b[m, k] += w1
        elif winner == "B":
            b[k, m] += w2
    return b


def elo_scores(B: np.ndarray, iters: int = 200, lr: float = 0.1) -> np.ndarray:
    """Ratings ε maximising Σ_mk B_mk log σ(ε_m − ε_k) − (λ/2)·‖ε‖² (Meta-Rewarding §2.2), mean 0.

    Bradley-Terry ratings in natural log-odds units (multiply by 400/ln 10 for chess Elo). Deterministic
    gradient ascent from zero; the step is capped by the gradient's Lipschitz bound so it cannot oscillate.
    """
    b = np.asarray(B, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] != b.shape[1]:
        raise ValueError(f"battle matrix must be square, got shape {b.shape}")
    if not np.all(np.isfinite(b)) or np.any(b < 0):
        raise ValueError("battle matrix must be finite and non-negative")
    n = b.shape[0]
    eps = np.zeros(n, dtype=np.float64)
    if n == 0:
        return eps
    # Hessian of the log-likelihood is bounded by (1/4)·Laplacian(B + Bᵀ), whose eigenvalues are <= 2·max degree.
    sym = b + b.T
    lipschitz = 0.5 * float(sym.sum(axis=1).max()) + _ELO_L2
    step = min(lr, 1.0 / lipschitz)
    for _ in range(iters):
        diff = eps[:, None] - eps[None, :]
        # 1 − σ(d) written with tanh: no overflow for large rating gaps.
        g = b * 0.5 * (1.0 - np.tanh(diff / 2.0))
        eps = eps + step * (g.sum(axis=1) - g.sum(axis=0) - _ELO_L2 * eps)
    return eps - eps.mean()


def meta_judge_candidates(scores: list[float | None]) -> list[int]:
    """Indices of the judgements the meta-judge compares: those with a parsed score (Meta-Rewarding §2.1-2.2).

    §2.1 discards judgements whose score cannot be parsed, so §2.2 meta-judges at most N judgements of a response;
    an unparsed judgement never takes part in a battle, so it cannot move the others' Elo ratings either. Length
    plays no part here: the paper's length filter acts on the chosen judgement of the finished pair
    (`select_judge_pair`).
    """
    return [i for i, s in enumerate(scores) if s is not None]


def select_judge_pair(
    judgements: list[str], scores: list[float | None], elo: np.ndarray, max_chars: int | None
) -> dict | None:
    """Judge pair (Meta-Rewarding §2.2): highest- vs lowest-Elo judgement among the scored ones.

    None when fewer than two judgements are scored, their ratings are all equal, or the chosen judgement is longer
    than max_chars (None: no limit). The length filter is the paper's counter to the meta-judge's own length bias
    (§2.2; §3.1 sets 1,100 characters in iteration 1, 1,000 in iteration 2, per secondary readings): it drops the
    PAIR, it does not fall back to the best short judgement, and an over-long REJECTED judgement is kept (a pair
    that rejects a long judgement works against the length bias, not with it).
    The two judgements may have the same score: the paper does not ask them to differ (see the module docstring).
    """
    if not len(judgements) == len(scores) == len(elo):
        raise ValueError("judgements, scores and elo must have the same length")
    keep = meta_judge_candidates(scores)
    if len(keep) < 2:
        return None
    ratings = [float(elo[i]) for i in keep]
    if max(ratings) - min(ratings) <= _ELO_TIE:
        return None
    # max()/min() return the first of equals: ties go to the earlier judgement.
    best = keep[max(range(len(keep)), key=lambda j: ratings[j])]
    worst = keep[min(range(len(keep)), key=lambda j: ratings[j])]
    if max_chars is not None and len(judgements[best]) > max_chars:
        return None
    return {
        "chosen": judgements[best],
        "rejected": judgements[worst],
        "chosen_elo": float(elo[best]),
        "rejected_elo": float(elo[worst]),
        "chosen_index": best,
        "rejected_index": worst,
    }


def pick_meta_judge_response(score_lists: list[list[float | None]]) -> int | None:
    """The response whose judgements disagree most (largest score variance; Meta-Rewarding §2.2).

    Needs at least two parsed scores; None if no response qualifies. The paper does not say how ties are broken;
    the reading taken is the first response in sampling order (deterministic, so a rerun picks the same one).
    """
    best, best_var = None, -1.0
    for i, scores in enumerate(score_lists):
        valid = [s for s in scores if s is not None]
        if len(valid) < 2:
            continue
        var = float(np.var(valid))
        if var > best_var + _EPS:
            best, best_var = i, var
    return best


def select_actor_pair(
    responses: list[str], mean_scores: list[float | None], rho: float, length_control: bool = True
) -> dict | None:
    """Actor pair from mean judge scores (Self-Rewarding §2.3; length control: Meta-Rewarding §2.1).

    Length control: chosen is the SHORTEST response scoring in [(1−ρ)S_max + ρS_min, S_max]; rejected the
    LONGEST in [S_min, (1−ρ)S_min + ρS_max]. Without it: highest vs lowest score, first on ties. Length is
    len(text) in characters (word count would also do; characters need no tokenizer and ignore markup less).
    None for fewer than two scored responses, all scores equal, or chosen not strictly above rejected.
    """
    if len(responses) != len(mean_scores):
        raise ValueError("responses and mean_scores must have the same length")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    scored = [(i, float(s)) for i, s in enumerate(mean_scores) if s is not None]
    if len(scored) < 2:
        return None
    s_max = max(s for _, s in scored)
    s_min = min(s for _, s in scored)
    if s_max - s_min <= _EPS:
        return None
    if length_control:
        top = [(i, s) for i, s in scored if s >= (1 - rho) * s_max + rho * s_min - _EPS]
        bottom = [(i, s) for i, s in scored if s <= (1 - rho) * s_min + rho * s_max + _EPS]
        # Among equal lengths prefer the higher (chosen) / lower (rejected) score, then the earlier response.
        chosen = min(top, key=lambda p: (len(responses[p[0]]), -p[1], p[0]))
        rejected = min(bottom, key=lambda p: (-len(responses[p[0]]), p[1], p[0]))
    else:
        chosen = max(scored, key=lambda p: (p[1], -p[0]))
        rejected = min(scored, key=lambda p: (p[1], p[0]))
    (ci, cs), (ri, rs) = chosen, rejected
    if not cs > rs:  # with ρ > 0.5 the windows overlap and both ends could pick the same response
        return None
    return {
        "chosen": responses[ci],
        "rejected": responses[ri],
        "chosen_score": cs,
        "rejected_score": rs,
        "chosen_length": len(responses[ci]),
        "rejected_length": len(responses[ri]),
    }


def rho_for(iteration: int, rhos: list[float]) -> float:
    """ρ for a 1-based iteration, the last value repeating (Meta-Rewarding §3.1; rewards/schedule.py)."""
    return per_iteration(rhos, iteration, "meta_rewarding.length_rho")
