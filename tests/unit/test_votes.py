"""ScPO votes and pairs on crafted samples: ties, no answer, all equal, threshold edges, gold supervision."""

from __future__ import annotations

import doctest

import pytest

import rewards.votes
from rewards.votes import build_pair, consistency, majority_answer, vote_counts, vote_threshold_for


def samples(*answers):
    return [{"text": f"s{i}", "answer": a} for i, a in enumerate(answers)]


# --- votes ---------------------------------------------------------------------------------------------------


def test_counts_ignore_missing_and_group_equal_numbers():
    assert vote_counts(["7", "7.0", None, "8", "+7"]) == {"7": 3, "8": 1}
    assert vote_counts(["1,234", "1234"]) == {"1234": 2}
    assert vote_counts([None, None]) == {} and vote_counts([]) == {}


def test_counts_keep_first_appearance_order():
    assert list(vote_counts(["9", "8", "9", "7"])) == ["9", "8", "7"]


def test_counts_for_choice_and_exact():
    assert vote_counts(["B", "C", "B", None], "choice") == {"B": 2, "C": 1}
    assert vote_counts(["paris", "rome", "paris"], "exact") == {"paris": 2, "rome": 1}


def test_consistency_counts_unanswered_in_denominator():
    assert consistency(["7", "7", None, "8"]) == 0.5
    assert consistency(["7", None, None, None]) == 0.25
    assert consistency(["7", "7.0", "7"]) == 1.0
    assert consistency([None, None]) == 0.0 and consistency([]) == 0.0


def test_majority_and_ties():
    assert majority_answer(["8", "7", "7"]) == "7"
    assert majority_answer(["8", "7", "7", "8"]) == "8", "tie: the answer seen first"
    assert majority_answer([None, "7", "8", "8", "7"]) == "7"
    assert majority_answer([None]) is None and majority_answer([]) is None
    assert majority_answer(["7.00", "7"]) == "7", "the canonical key"


# --- unsupervised pairs --------------------------------------------------------------------------------------


def test_pair_most_vs_least_voted_and_weight():
    p = build_pair(samples("7", "7", "8", None, "7", "9", "9", "7"), k=8, threshold=0.5)
    assert p == {
        "chosen": "s0",
        "rejected": "s2",
        "chosen_answer": "7",
        "rejected_answer": "8",
        "chosen_votes": 4,
        "rejected_votes": 1,
        "num_samples": 8,
        "weight": (4 - 1) / 8,
    }


def test_weight_uses_k_not_answered_count():
    p = build_pair(samples("3", "3", "3", "4", None, None), k=6, threshold=0.0)
    assert p["weight"] == (3 - 1) / 6 and p["num_samples"] == 6


def test_chosen_is_first_sample_with_majority_answer():
    p = build_pair(samples("2", "5", "5.0", "5"), k=4, threshold=0.0)
    assert (p["chosen"], p["chosen_answer"], p["chosen_votes"]) == ("s1", "5", 3)


def test_no_answer_never_chosen_or_rejected():
    p = build_pair(samples(None, None, "3", "3", "3", "3", "4", None), k=8, threshold=0.5)
    assert p["chosen"] == "s2" and p["rejected"] == "s6"
    assert None not in (p["chosen_answer"], p["rejected_answer"])


def test_missing_answer_key_counts_as_no_answer():
    rows = [{"text": "a"}, {"text": "b", "answer": "1"}, {"text": "c", "answer": "2"}, {"text": "d", "answer": "1"}]
    p = build_pair(rows, k=4, threshold=0.0)
    assert (p["chosen"], p["rejected"], p["chosen_votes"]) == ("b", "c", 2)


def test_no_pair_when_all_equal_or_single_answer():
    assert build_pair(samples("5", "5", "5", "5"), k=4, threshold=0.0) is None
    assert build_pair(samples("5", "5.0", "+5", "5"), k=4, threshold=0.0) is None, "equal after canonicalising"
    assert build_pair(samples("5", None, None, None), k=4, threshold=0.0) is None
    assert build_pair(samples(None, None), k=2, threshold=0.0) is None
    assert build_pair([], k=8, threshold=0.0) is None


def test_two_way_tie_gives_no_pair():
    # 4-4 of 8 (seen in a real SmolLM2 run): nothing to prefer, and a weight-0 pair would train on nothing
    assert build_pair(samples("8", "7", "7", "8"), k=4, threshold=0.5) is None
    assert build_pair(samples("8", "7", "9", "7", "8", "9"), k=6, threshold=0.0) is None


def test_min_margin_zero_keeps_ties_and_two_needs_a_clear_lead():
    p = build_pair(samples("8", "7"), k=2, threshold=0.0, min_margin=0)
    assert (p["chosen_answer"], p["rejected_answer"], p["weight"]) == ("8", "7", 0.0)
    assert build_pair(samples("8", "8", "7"), k=3, threshold=0.0, min_margin=2) is None
    assert build_pair(samples("8", "8", "8", "7"), k=4, threshold=0.0, min_margin=2)["weight"] == 0.5


def test_majority_tie_chooses_first_seen_and_rejects_a_less_voted_answer():
    p = build_pair(samples("8", "7", "7", "8", "9"), k=5, threshold=0.4)
    assert (p["chosen_answer"], p["rejected_answer"], p["chosen_votes"], p["rejected_votes"]) == ("8", "9", 2, 1)
    assert p["weight"] == pytest.approx(1 / 5)


def test_rejected_tie_takes_first_least_voted():
    p = build_pair(samples("1", "1", "1", "2", "3"), k=5, threshold=0.0)
    assert (p["rejected"], p["rejected_answer"]) == ("s3", "2")
    p = build_pair(samples("3", "1", "1", "1", "2", "2", "3", "4", "5"), k=9, threshold=0.0)
    assert (p["rejected"], p["rejected_answer"], p["rejected_votes"]) == ("s7", "4", 1)


def test_threshold_exactly_at_tau_k_passes():
    # 0.5 * 8 = 4: four votes are enough
    assert build_pair(samples("1", "1", "1", "1", "2", "3", "4", "5"), k=8, threshold=0.5)["chosen_votes"] == 4
    # 0.3 * 10 = 3.0000000000000004 in floats: three votes still pass
    assert build_pair(samples(*"1112345678"), k=10, threshold=0.3)["chosen_votes"] == 3
    assert build_pair(samples("1", "1", "1", "1", "2", "2", "2", "3"), k=8, threshold=0.5) is not None


def test_threshold_just_below_fails():
    assert build_pair(samples("1", "1", "1", "2", "2", "3", "4", None), k=8, threshold=0.5) is None  # 3 < 4
    assert build_pair(samples(*"1123456789"), k=10, threshold=0.3) is None  # 2 < 3


def test_threshold_fraction_rounds_up():
    # 0.7 * 8 = 5.6: six votes needed, five fail
    five = samples("1", "1", "1", "1", "1", "2", "3", "4")
    six = samples("1", "1", "1", "1", "1", "1", "2", "3")
    assert build_pair(five, k=8, threshold=0.7) is None
    assert build_pair(six, k=8, threshold=0.7)["chosen_votes"] == 6


def test_threshold_counts_against_k_including_unanswered():
    # 4 of 8 answered and all agree bar one, but 3 votes < 0.5 * 8
    assert build_pair(samples("1", "1", "1", "2", None, None, None, None), k=8, threshold=0.5) is None


def test_bad_k_is_an_error():
    with pytest.raises(ValueError):
        build_pair(samples("1", "2"), k=0, threshold=0.5)


def test_choice_pairs():
    p = build_pair(samples("B", "B", "C", "B"), k=4, threshold=0.5, answer_type="choice")
    assert (p["chosen_answer"], p["rejected_answer"], p["weight"]) == ("B", "C", 0.5)


# --- semi-supervised pairs -----------------------------------------------------------------------------------


def test_semi_supervised_uses_gold():
    s = samples("8", "8", "8", "7", "9")
    p = build_pair(s, k=5, threshold=0.9, gold="7", semi_supervised=True)
    assert (p["chosen"], p["chosen_answer"]) == ("s3", "7"), "gold decides, no threshold"
    assert (p["rejected"], p["rejected_answer"]) == ("s0", "8"), "the most-voted wrong answer is rejected"
    assert p["chosen_votes"] == 1 and p["rejected_votes"] == 3 and p["num_samples"] == 5
    assert p["weight"] == 1.0, "a gold pair is certain; the vote margin (-2/5) would flip the loss"


def test_semi_supervised_gold_equivalence_and_ties():
    s = samples("0.5", "3", "1/2", "4", "4", "3")
    p = build_pair(s, k=6, threshold=1.0, gold="\\frac{1}{2}", semi_supervised=True)
    assert p["chosen"] == "s0" and p["chosen_answer"] == "0.5", "math-verify matches 0.5 to 1/2"
    assert p["rejected_answer"] == "3", "tie between wrong answers: the one seen first"


def test_semi_supervised_gold_missing_among_samples():
    s = samples("8", "8", "9", None)
    assert build_pair(s, k=4, threshold=0.0, gold="6", semi_supervised=True) is None


def test_semi_supervised_no_wrong_answer():
    assert build_pair(samples("7", "7", None), k=3, threshold=0.0, gold="7", semi_supervised=True) is None
    assert build_pair(samples("7", "7.0", "+7"), k=3, threshold=0.0, gold="7", semi_supervised=True) is None


def test_semi_supervised_without_gold_falls_back_to_votes():
    s = samples("8", "8", "8", "7")
    p = build_pair(s, k=4, threshold=0.5, gold=None, semi_supervised=True)
    assert (p["chosen_answer"], p["rejected_answer"], p["weight"]) == ("8", "7", 0.5)
    assert build_pair(s, k=4, threshold=0.9, gold=None, semi_supervised=True) is None, "threshold applies again"


def test_gold_ignored_unless_semi_supervised():
    p = build_pair(samples("8", "8", "8", "7"), k=4, threshold=0.5, gold="7")
    assert p["chosen_answer"] == "8"


# --- schedule ------------------------------------------------------------------------------------------------


def test_threshold_schedule():
    assert [vote_threshold_for(i, [0.5, 0.7]) for i in (1, 2, 3, 10)] == [0.5, 0.7, 0.7, 0.7]
    assert vote_threshold_for(4, [0.6]) == 0.6
    with pytest.raises(ValueError):
        vote_threshold_for(0, [0.5])
    with pytest.raises(ValueError):
        vote_threshold_for(1, [])


def test_doctests():
    assert doctest.testmod(rewards.votes).failed == 0
