"""Forced verdicts: unparsed judgements are continued with the verdict prefix, parsed ones untouched."""

from __future__ import annotations

from rewards.judge import parse_winner
from train.algorithms.self_judge import SCORE_CHOICES, SCORE_PREFIX, WINNER_CHOICES, WINNER_PREFIX, _force, judge
from train.config import SamplingConfig
from train.engine import GenParams, HFSampler


def test_force_continues_only_unparsed(tiny_model_dir):
    from rewards.judge import parse_score

    s = HFSampler(tiny_model_dir, SamplingConfig(engine="hf"), seed=0)
    convs = [[{"role": "user", "content": "judge this"}]] * 2
    texts = [["Great answer. Score: 4", "rambling without a verdict"], ["Score: 10 is out of range"]]
    forced, n = _force(s, convs, texts, parse_score, SCORE_PREFIX, SCORE_CHOICES)
    assert n == 2
    assert forced[0][0] == "Great answer. Score: 4"
    assert forced[0][1].startswith("rambling without a verdict" + SCORE_PREFIX)
    assert forced[1][0].startswith("Score: 10 is out of range" + SCORE_PREFIX)
    assert texts[0][1] == "rambling without a verdict", "inputs are not mutated"
    assert parse_score(forced[0][1]) in {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}, "the forced token is a valid score"
    assert parse_score(forced[1][0]) in {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}


def test_force_winner_is_a_or_b(tiny_model_dir):
    s = HFSampler(tiny_model_dir, SamplingConfig(engine="hf"), seed=0)
    forced, n = _force(
        s, [[{"role": "user", "content": "x"}]], [["no verdict"]], parse_winner, WINNER_PREFIX, WINNER_CHOICES
    )
    assert n == 1 and parse_winner(forced[0][0]) in ("A", "B")


def test_judge_counts_forced_and_shapes(tiny_model_dir):
    s = HFSampler(tiny_model_dir, SamplingConfig(engine="hf"), seed=0)
    convs = [[{"role": "user", "content": "judge A"}], [{"role": "user", "content": "judge B"}]]
    texts, scores, forced = judge(s, convs, GenParams(n=3, temperature=1.0, max_tokens=6), force_verdict=True)
    assert [len(t) for t in texts] == [3, 3] and [len(x) for x in scores] == [3, 3]
    # a random tiny model never writes a verdict itself, so all six are forced
    assert forced == 6 and all(SCORE_PREFIX in t for row in texts for t in row)
    assert all(x is not None for row in scores for x in row), "forced verdicts always parse"
