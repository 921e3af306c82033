"""Position debiasing, Elo, judge-pair and length-controlled actor-pair selection on crafted numbers."""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pytest

from rewards.judge_pairs import (
    battle_matrix,
    elo_scores,
    pick_meta_judge_response,
    position_debias_weights,
    rho_for,
    select_actor_pair,
    select_judge_pair,
)


def test_position_debias_weights():
    assert position_debias_weights(3, 1) == (0.25, 0.75)  # first-slot wins are common, so they count less
    assert position_debias_weights(1, 3) == (0.75, 0.25)
    assert position_debias_weights(2, 2) == (0.5, 0.5)
    assert position_debias_weights(0, 0) == (0.5, 0.5)
    assert position_debias_weights(4, 0) == (0.0, 1.0)


def test_battle_matrix_weights_by_position_and_ignores_none():
    outcomes = [(0, 1, "A"), (1, 0, "A"), (0, 2, "A"), (2, 0, "B"), (1, 2, None)]
    b = battle_matrix(3, outcomes)  # 3 first-slot wins, 1 second-slot win: ω1 = 0.25, ω2 = 0.75
    expected = np.zeros((3, 3))
    expected[0, 1] = 0.25
    expected[1, 0] = 0.25
    expected[0, 2] = 0.25 + 0.75  # 0 won from the first slot against 2, and from the second slot too
    np.testing.assert_allclose(b, expected)


def test_battle_matrix_rejects_bad_indices():
    with pytest.raises(ValueError):
        battle_matrix(2, [(0, 2, "A")])
    with pytest.raises(ValueError):
        battle_matrix(2, [(1, 1, "A")])


def _transitive_outcomes(order: list[int]) -> list[tuple[int, int, str]]:
    """Every ordered pair once; the judgement earlier in `order` always wins, whatever its slot."""
    rank = {j: r for r, j in enumerate(order)}
    return [(m, n, "A" if rank[m] < rank[n] else "B") for m, n in permutations(order, 2)]


def test_elo_orders_a_transitive_tournament():
    elo = elo_scores(battle_matrix(3, _transitive_outcomes([0, 1, 2])))
    assert elo[0] > elo[1] > elo[2]
    assert abs(elo.mean()) < 1e-12
    assert np.array_equal(elo, elo_scores(battle_matrix(3, _transitive_outcomes([0, 1, 2]))))  # deterministic


def test_elo_first_slot_always_wins_gives_equal_ratings():
    outcomes = [(m, n, "A") for m, n in permutations(range(4), 2)]
    elo = elo_scores(battle_matrix(4, outcomes))
    np.testing.assert_allclose(elo, 0.0, atol=1e-12)
    judgements = [f"judgement {i}. Score: 3" for i in range(4)]
    assert select_judge_pair(judgements, [3.0] * 4, elo, max_chars=100) is None


def test_elo_is_stable_for_a_large_tournament():
    n = 11  # the paper's N: 110 ordered battles, large gradient; the step cap keeps ascent monotone
    elo = elo_scores(battle_matrix(n, _transitive_outcomes(list(range(n)))), iters=500, lr=10.0)
    assert np.all(np.isfinite(elo))
    assert np.all(np.diff(elo) < 0)


def test_elo_empty_and_invalid():
    assert elo_scores(np.zeros((0, 0))).shape == (0,)
    with pytest.raises(ValueError):
        elo_scores(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        elo_scores(-np.ones((2, 2)))


def test_select_judge_pair_highest_vs_lowest_elo():
    judgements = ["good. Score: 4", "ok. Score: 3", "bad. Score: 1"]
    elo = np.array([1.0, 0.0, -1.0])
    pair = select_judge_pair(judgements, [4.0, 3.0, 1.0], elo, max_chars=100)
    assert pair == {
        "chosen": "good. Score: 4",
        "rejected": "bad. Score: 1",
        "chosen_elo": 1.0,
        "rejected_elo": -1.0,
        "chosen_index": 0,
        "rejected_index": 2,
    }


def test_select_judge_pair_skips_unscored_and_drops_a_long_chosen():
    judgements = ["x" * 50 + " Score: 5", "ok. Score: 3", "no score at all", "meh. Score: 2"]
    elo = np.array([2.0, 0.5, -3.0, -0.5])
    pair = select_judge_pair(judgements, [5.0, 3.0, None, 2.0], elo, max_chars=100)
    assert (pair["chosen_index"], pair["rejected_index"]) == (0, 3)  # the unscored -3.0 is never the rejected one
    # Meta-Rewarding §2.2: the over-long chosen judgement drops the pair; no fall-back to the best short one.
    assert select_judge_pair(judgements, [5.0, 3.0, None, 2.0], elo, max_chars=20) is None
    assert select_judge_pair(judgements, [5.0, None, None, None], elo, max_chars=100) is None


def test_pick_meta_judge_response_largest_variance():
    assert pick_meta_judge_response([[3, 3, 3], [1, 5, None], [2, 4, 3]]) == 1
    assert pick_meta_judge_response([[1, 2], [4, 5], [None, 5]]) == 0  # equal variance: first
    assert pick_meta_judge_response([[None, 4], [None, None], []]) is None
    assert pick_meta_judge_response([[4, None], [2, 2]]) == 1  # only one with two scores


RESPONSES = ["a" * 100, "b" * 40, "c" * 10, "d" * 300, "e" * 60]


def test_length_control_rho_zero_shortest_best_longest_worst():
    scores = [5.0, 5.0, 4.0, 2.0, 2.0]
    pair = select_actor_pair(RESPONSES, scores, rho=0.0)
    assert pair["chosen"] == "b" * 40  # shortest of the two 5s
    assert pair["rejected"] == "d" * 300  # longest of the two 2s
    assert (pair["chosen_score"], pair["rejected_score"]) == (5.0, 2.0)
    assert (pair["chosen_length"], pair["rejected_length"]) == (40, 300)


def test_length_control_rho_widens_the_window():
    scores = [5.0, 5.0, 4.2, 2.0, 2.0]
    # ρ = 0.3: chosen window [0.7·5 + 0.3·2, 5] = [4.1, 5] takes in the 10-char 4.2 response.
    pair = select_actor_pair(RESPONSES, scores, rho=0.3)
    assert (pair["chosen"], pair["chosen_score"]) == ("c" * 10, 4.2)
    assert pair["rejected"] == "d" * 300
    # Rejected window [2, 0.7·2 + 0.3·5] = [2, 2.9]: a long 2.8 beats the shorter 2.0s.
    longer = RESPONSES + ["f" * 500]
    pair = select_actor_pair(longer, scores + [2.8], rho=0.3)
    assert (pair["rejected"], pair["rejected_score"]) == ("f" * 500, 2.8)


def test_length_control_overlapping_windows_need_a_strict_gap():
    # ρ = 1 makes both windows the whole range: shortest vs longest, only if the shortest scores higher.
    assert select_actor_pair(["short", "a much longer answer"], [2.0, 4.0], rho=1.0) is None
    pair = select_actor_pair(["short", "a much longer answer"], [4.0, 2.0], rho=1.0)
    assert (pair["chosen"], pair["rejected"]) == ("short", "a much longer answer")


def test_actor_pair_none_cases_and_null_scores():
    assert select_actor_pair(RESPONSES, [3.0] * 5, rho=0.0) is None
    assert select_actor_pair(RESPONSES, [3.0, None, None, None, None], rho=0.0) is None
    pair = select_actor_pair(RESPONSES, [None, 4.0, None, 1.0, None], rho=0.0)
    assert (pair["chosen"], pair["rejected"]) == ("b" * 40, "d" * 300)
    with pytest.raises(ValueError):
        select_actor_pair(RESPONSES, [1.0] * 5, rho=1.5)


def test_self_rewarding_mode_highest_vs_lowest():
    scores = [4.0, 5.0, 5.0, 1.0, 1.0]
    pair = select_actor_pair(RESPONSES, scores, rho=0.4, length_control=False)
    assert (pair["chosen"], pair["rejected"]) == ("b" * 40, "d" * 300)  # first of the ties, lengths ignored
    assert (pair["chosen_score"], pair["rejected_score"]) == (5.0, 1.0)


def test_rho_for():
    rhos = [0.0, 0.32, 0.4]
    assert [rho_for(k, rhos) for k in (1, 2, 3, 4, 9)] == [0.0, 0.32, 0.4, 0.4, 0.4]
    with pytest.raises(ValueError):
        rho_for(0, rhos)
    with pytest.raises(ValueError):
        rho_for(1, [])


def test_meta_judge_prompt_is_figure_2_word_for_word():
    """Meta-Rewarding Figure 2: the instructions after the judgments, with nothing of ours added (an extra line about
    order or length would move the verdicts that §2.2's position weights and Elo are computed from)."""
    from rewards.judge import meta_judge_prompt

    text = meta_judge_prompt("Q?", "R.", "J1", "J2")
    tail = text[text.index("After examining the original question") :]
    words = " ".join(tail.split())
    assert words == (
        "After examining the original question, response, and both judgments: - Explain which judgment is more "
        "accurate according to the original rubric and why. Consider factors such as adherence to the rubric, "
        "accuracy in evaluating the response, and consistency in applying the criteria. - Conclude with a clear "
        "statement of which judgment is better using the format: “Winner: [Judgement A | Judgement B]”"
    )
    assert text.index("Judgment A: J1") < text.index("Judgment B: J2")
