"""Judge prompts and the Score/Winner parsers on literal judge outputs."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.judge import JUDGE_PROMPT, META_JUDGE_PROMPT, judge_prompt, meta_judge_prompt, parse_score, parse_winner


def test_judge_prompt_is_the_papers_and_formats():
    text = judge_prompt("What is {x}?", "It is <b>.")
    assert text.startswith("Review the user's question and the corresponding response using the additive 5-point")
    assert "Bestow a fifth point for a response that is impeccably tailored" in text
    assert "User: What is {x}?\n\n<response>It is <b>.</response>" in text
    assert "Conclude with the score using the format: “Score: <total points>”" in text
    assert text.endswith("we'll systematically attribute points based on the outlined criteria.")
    assert JUDGE_PROMPT.count("{prompt}") == 1 and JUDGE_PROMPT.count("{response}") == 1


def test_meta_judge_prompt_shows_both_judgements_in_order():
    text = meta_judge_prompt("Q?", "R.", "first one. Score: 4", "second one. Score: 2")
    assert text.startswith("Review the user's question and the corresponding response, along with two judgments.")
    assert "Add another point if the response addresses a substantial portion" in text
    assert text.index("Judgment A: first one.") < text.index("Judgment B: second one.")
    assert "User: Q?\n\nResponse: R." in text
    assert text.endswith("“Winner: [Judgement A | Judgement B]”")
    for field in ("{prompt}", "{response}", "{judgement_a}", "{judgement_b}"):
        assert META_JUDGE_PROMPT.count(field) == 1


SCORES = [
    ("Score: 4", 4.0),
    ("score:4", 4.0),
    ("The answer is relevant and mostly complete but lacks an example. Score: 3", 3.0),
    ("Score: 4.5", 4.5),
    ("Score: 10", None),  # out of range, never a truncated 1
    ("Score: 0", 0.0),
    ("The response is on topic.\nIt addresses most of the question.\nIt is well organized.\nScore: 4", 4.0),
    ("Good answer.\n\n**Score:** 5", 5.0),
    ("**Score: 2**", 2.0),
    ("Score: 4/5", 4.0),
    ("Score: 8/10", None),  # another scale: not ours to rescale
    ("Score - 4", 4.0),
    ("Total score: 4", 4.0),
    ("Score: <4>", 4.0),
    ("Score: [3]", 3.0),
    ("Final Score (out of 5): 2", 2.0),
    ("Score:\n3", 3.0),
    ("Score: 2\nOn reflection it deserves more.\nScore: 4", 4.0),  # last wins
    ("Score: 4\nScore: 10", None),  # the final verdict is invalid
    ("I give it 3 out of 5.", 3.0),
    ("Overall 4/5 for this response.", 4.0),
    ("Total points: 2", 2.0),
    ("Relevant (1), substantial (2), useful basics (3). The response earns 3 points.", 3.0),
    ("no score here", None),
    ("", None),
    ("Score: -1", None),
    ("Score: five", None),  # number words are not read: a dropped judgement beats a misread one
    ("Conclude with the score using the format: “Score: <total points>”", None),
    ("It scored 7 out of 10.", None),
]


@pytest.mark.parametrize("text,expected", SCORES)
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_parse_score_max_score_changes_range():
    assert parse_score("Score: 8", max_score=10) == 8.0
    assert parse_score("Score: 8/10", max_score=10) == 8.0
    assert parse_score("7 out of 10", max_score=10) == 7.0
    assert parse_score("Score: 8", max_score=5) is None


def test_parse_score_points_fallback_only_near_the_end():
    head = "Add 1 point if the response is relevant. " + "x" * 300
    assert parse_score(head) is None


WINNERS = [
    ("Winner: Judgement A", "A"),
    ("Winner: Judgment B", "B"),
    ("**Winner:** [Judgement B]", "B"),
    ("Winner: A", "A"),
    ("winner: judgement b", "B"),
    ("Judgement B applies the rubric.\nThe winner is Judgement B.", "B"),
    ("Winner: Judgement A\nOn second thought...\nWinner: Judgement B", "B"),
    ("Winner: Judgement A. Judgement A is the winner.", "A"),  # a winner with no label after it is skipped
    ("Winner: [Judgement A | Judgement B]", None),  # the format echoed back
    ("Winner: Judgement A or Judgement B", None),
    ("Winner: a tie", None),
    ("Winner: Tie", None),
    ("Winner: neither", None),
    ("Winner: Judgement A\nWinner: both are equally good", None),
    ("Judgement A is better.", None),
    ("no verdict", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", WINNERS)
def test_parse_winner(text, expected):
    assert parse_winner(text) == expected


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_parsers_never_raise_on_any_text(text):
    score = parse_score(text)
    assert score is None or 0.0 <= score <= 5.0
    assert parse_winner(text) in ("A", "B", None)


_PIECES = st.sampled_from(
    [
        "Score",
        "score",
        ":",
        "**",
        " ",
        "\n",
        "-",
        "/",
        "5",
        "10",
        "4.5",
        "out of",
        "points",
        "Winner",
        "Judgement",
        "A",
        "B",
        "|",
        "[",
        "]",
        "<",
        ">",
        "total",
        "−",
        "9" * 400,
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=30).map("".join))
def test_parsers_never_raise_on_near_misses(text):
    score = parse_score(text)
    assert score is None or 0.0 <= score <= 5.0
    assert parse_winner(text) in ("A", "B", None)


def test_parsers_are_linear_on_long_padding():
    # A rambling small judge can emit long runs of spaces or asterisks; nested optional classes would be quadratic.
    start = time.perf_counter()
    for pad in (" " * 200_000, "*" * 200_000):
        assert parse_score("Score:" + pad + "x") is None
        assert parse_winner("Winner:" + pad + "x") is None
    assert time.perf_counter() - start < 2.0
