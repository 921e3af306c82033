"""Per-iteration schedules: ScPO's vote threshold τ (Prasad et al., 2024, §3) and Meta-Rewarding's length-control
ρ (Wu et al., 2024, §3.1) are both given one value per iteration, the last one repeating."""

from __future__ import annotations


def per_iteration(values: list[float], iteration: int, name: str = "schedule") -> float:
    """values[iteration − 1] for a 1-based iteration, the last value repeating.

    >>> [per_iteration([0.5, 0.7], i) for i in (1, 2, 3)]
    [0.5, 0.7, 0.7]
    """
    if iteration < 1:
        raise ValueError(f"{name}: iterations are 1-based, got {iteration}")
    if not values:
        raise ValueError(f"{name} is empty: give one value per iteration (the last repeats)")
    return float(values[min(iteration, len(values)) - 1])
