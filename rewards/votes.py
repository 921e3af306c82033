"""Self-consistency votes and ScPO preference pairs (Prasad et al., 2024), as pure functions on plain dicts.

V(y) = the number of samples whose answer groups with ans(y) (same `answer_key`). Samples without an answer
get no vote and are never chosen or rejected, but they still count in consistency's denominator.

>>> vote_counts(["7", "7.0", None, "8"])
{'7': 2, '8': 1}
>>> pair = build_pair([{"text": "a", "answer": "7"}, {"text": "b", "answer": "7"}, {"text": "c", "answer": "8"}], 3, 0.5)
>>> pair["chosen"], pair["rejected"], round(pair["weight"], 3)
('a', 'c', 0.333)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rewards.answers import answer_key, answers_equal
from rewards.schedule import per_iteration

_EPS = 1e-9  # 0.7 * 8 is 5.6000000000000005 and 0.3 * 10 is 3.0000000000000004: compare with slack


def vote_counts(answers: list[str | None], answer_type: str = "number") -> dict[str, int]:
    """Votes per canonical answer key, in order of first appearance; None gets no vote."""
    return dict(Counter(answer_key(a, answer_type) for a in answers if a is not None))


def majority_answer(answers: list[str | None], answer_type: str = "number") -> str | None:
    """Most-voted key; a tie goes to the answer seen first. None when nothing parsed.

    >>> majority_answer(["8", "7", "7", "8", None])
    '8'
    """
    counts = vote_counts(answers, answer_type)
    return max(counts, key=counts.__getitem__) if counts else None  # max keeps the first of equals


def consistency(answers: list[str | None], answer_type: str = "number") -> float:
    """Share of all samples (unanswered ones included) that agree with the majority; 0.0 if none parsed.

    >>> consistency(["7", "7", None, "8"])
    0.5
    """
    counts = vote_counts(answers, answer_type)
    return max(counts.values()) / len(answers) if counts else 0.0


def vote_threshold_for(iteration: int, thresholds: list[float]) -> float:
    """τ for a 1-based iteration; the last value repeats (rewards/schedule.py)."""
    return per_iteration(thresholds, iteration, "scpo.vote_threshold")


def _first_with(samples: list[dict[str, Any]], key: str, answer_type: str) -> dict[str, Any]:
    return next(s for s in samples if s.get("answer") is not None and answer_key(s["answer"], answer_type) == key)


def build_pair(
    samples: list[dict[str, Any]],
    k: int,
    threshold: float,
    answer_type: str = "number",
    gold: str | None = None,
    semi_supervised: bool = False,
    min_margin: int = 1,
) -> dict[str, Any] | None:
    """ScPO pair from k samples ({"text", "answer"}); None when there is none.

    Unsupervised: y+ is the first sample with the most-voted answer, y- the first sample with the least-voted
    different answer (ties: the one seen first); kept only if V(y+) >= threshold * k and V(y+) - V(y-) >= min_margin (1: no ties). Weight (V(y+) - V(y-)) / k.

    Semi-supervised with a gold answer: y+ has the gold answer (its most-voted spelling), y- the most-voted wrong
    answer (IRPO-style); no threshold, weight 1.0, since V(y+) - V(y-) can be negative here and would flip the loss.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    counts = vote_counts([s.get("answer") for s in samples], answer_type)
    if len(counts) < 2:
        return None
    supervised = semi_supervised and gold is not None
    if supervised:
        right = [key for key in counts if answers_equal(key, gold, answer_type)]
        wrong = [key for key in counts if key not in right]
        if not right or not wrong:
            return None
        chosen_key = max(right, key=counts.__getitem__)
        rejected_key = max(wrong, key=counts.__getitem__)
    else:
        chosen_key = max(counts, key=counts.__getitem__)
        if counts[chosen_key] + _EPS < threshold * k:
            return None
        rejected_key = min((key for key in counts if key != chosen_key), key=counts.__getitem__)
        if counts[chosen_key] - counts[rejected_key] < min_margin:  # a 4-4 tie of 8 has nothing to prefer
            return None
    chosen, rejected = _first_with(samples, chosen_key, answer_type), _first_with(samples, rejected_key, answer_type)
    return {
        "chosen": chosen["text"],
        "rejected": rejected["text"],
        "chosen_answer": chosen["answer"],
        "rejected_answer": rejected["answer"],
        "chosen_votes": counts[chosen_key],
        "rejected_votes": counts[rejected_key],
        "num_samples": k,
        "weight": 1.0 if supervised else (counts[chosen_key] - counts[rejected_key]) / k,
    }
