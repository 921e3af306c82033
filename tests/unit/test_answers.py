"""Answer extraction, equivalence and gold parsing on literal strings, plus a fuzz test."""

from __future__ import annotations

import doctest
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rewards.answers
from rewards.answers import answer_key, answers_equal, extract_answer, normalize_number, parse_gold


@pytest.mark.parametrize(
    "text, expected",
    [
        # Answer clauses
        ("3 + 4 = 7. Answer: 7", "7"),
        ("Answer: 42.", "42"),
        ("The answer is -3", "-3"),
        ("The answer is -3.", "-3"),
        ("Final answer: **12**", "12"),
        ("**Final Answer:** 12", "12"),
        ("final ANSWER: $12$.", "12"),
        ("The answer is therefore 12 apples.", "12"),
        ("Answer: 5, since 2 + 3 = 5 and 9 is wrong", "5"),  # the clause beats the last number
        ("Answer: 42\nI hope the answer is clear. Step 3", "42"),  # a clause without a number is skipped
        ("Answer: 42. Actually, the answer is 43", "43"),  # the last clause wins
        ("Answer:\n\n42", "42"),
        ("Answer: x = 1/2.", "1/2"),
        ("Answer: $\\frac{3}{4}$", "\\frac{3}{4}"),
        ("Answer: \\frac{1}{2}. Done", "\\frac{1}{2}"),
        ("The answer is $\\$18$.", "18"),
        ("answer: .5", "0.5"),
        # \boxed{} beats everything, nested braces kept
        ("so \\boxed{19} and then 3 more", "19"),
        ("\\boxed{1} first, then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
        ("Answer: 3. Thus \\boxed{4}", "4"),
        ("\\boxed{\\$1,234.50}", "1234.5"),
        ("\\boxed{5 \\text{ cm}}", "5"),
        ("\\boxed{90^\\circ}", "90"),
        ("\\boxed{2} and an unfinished \\boxed{", "2"),
        # the last number, normalised
        ("We have 1,234 apples", "1234"),
        ("1,234,567 grains", "1234567"),
        ("x = 7.50", "7.5"),
        ("7.0", "7"),
        ("+7", "7"),
        ("-0", "0"),
        ("-0.0", "0"),
        ("007", "7"),
        ("It costs 1.5.", "1.5"),
        ("12 + 7 = 19", "19"),
        ("pages 10-20", "20"),  # a hyphen between numbers is not a minus sign
        ("3 - 4 = -1", "-1"),
        # noise after the answer
        ("The answer is 12.\nScore: 5/10", "12"),
        ("Step 1: 5 apples. Step 2: 3 more. Total 8", "8"),
        # nothing to find
        ("Three is the sum of four and one.", None),
        ("The answer is seven.", None),
        ("", None),
        ("   \n ", None),
        ("\\boxed{", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: (B)", "B"),
        ("the answer is C", "C"),
        ("The answer is (d).", "D"),
        ("\\boxed{D}", "D"),
        ("\\boxed{\\text{E}}", "E"),
        ("**B**", "B"),
        ("I pick **(C)**.", "C"),
        ("B", "B"),
        ("b", "B"),
        ("(A)", "A"),
        ("I think A", "A"),
        ("Option B", "B"),
        ("A good question.", None),  # the article is not a choice
        ("The answer is clearly wrong", None),
        ("none", None),
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_answer(text, "choice") == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("blah\nAnswer:  New   York.", "new york"),
        ("Answer: Paris\nAnswer: Rome!", "rome"),
        ("**Answer:** **Paris**", "paris"),
        ("Answer:\n\n  Rome  ", "rome"),
        ("first line\nParis!", "paris"),
        ("first line\n  The   Eiffel Tower...  \n\n", "the eiffel tower"),
        ("Answer:   ", None),
        ("   ", None),
        ("?!.", None),
    ],
)
def test_extract_exact(text, expected):
    assert extract_answer(text, "exact") == expected


def test_normalize_number():
    assert [normalize_number(s) for s in ("1,234", "7.0", "+7", "-0", "-0.00", "007", ".5", "-.5", "10")] == [
        "1234",
        "7",
        "7",
        "0",
        "0",
        "7",
        "0.5",
        "-0.5",
        "10",
    ]
    assert normalize_number(" x ") == "x", "not a number: only stripped"


def test_math_verify_equivalence():
    assert answers_equal("0.5", "1/2") and answers_equal("1/2", "0.5")
    assert answers_equal("\\frac{1}{2}", "0.5") and answers_equal("\\frac{2}{4}", "\\frac{1}{2}")
    assert not answers_equal("1/2", "0.3")
    assert not answers_equal("\\frac{1}{2}", "\\frac{1}{3}")


def test_plain_number_equivalence():
    assert answers_equal("7", "7.00") and answers_equal("1,234", "1234") and answers_equal("-0", "0")
    assert not answers_equal("7", "8") and not answers_equal("7", "-7") and not answers_equal("0.1", "0.10001")


def test_none_never_equal():
    assert not answers_equal(None, None)
    assert not answers_equal("7", None) and not answers_equal(None, "7")
    assert not answers_equal(None, None, "choice") and not answers_equal(None, None, "exact")


def test_choice_and_exact_are_string_equality():
    assert answers_equal("B", "B", "choice") and not answers_equal("B", "C", "choice")
    assert answers_equal("new york", "new york", "exact") and not answers_equal("new york", "york", "exact")
    assert not answers_equal("0.5", "1/2", "exact"), "no math-verify outside numbers"


def test_long_strings_skip_math_verify():
    assert not answers_equal("1/2", "0.5" + " " * 300), "over 200 chars: compared only by key"
    assert answers_equal("7", "7" + " " * 300), "the cheap key still applies"


def test_math_verify_off_main_thread_does_not_raise():
    out = {}

    def work():
        out["frac"] = answers_equal("1/2", "0.5")
        out["tower"] = answers_equal("9^{9^{9^{9}}}", "1")  # skipped: no timeout available off the main thread

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=60)
    assert out == {"frac": True, "tower": False}


def test_answer_key_groups_equal_spellings():
    assert answer_key("7") == answer_key("7.0") == answer_key("7.00") == answer_key("+7") == "7"
    assert answer_key("1,234") == answer_key("1234.0") == "1234"
    assert answer_key("0.50") == "0.5" and answer_key("-0") == "0"
    assert answer_key("\\dfrac{1}{2}") == answer_key("\\frac {1}{2}") == "\\frac{1}{2}"
    assert answer_key("12345678901234567890") != answer_key("12345678901234567891"), "beyond float precision"
    assert answer_key("B", "choice") == "B" and answer_key("new york", "exact") == "new york"


def test_extracted_numbers_are_their_own_key():
    # votes.jsonl keys and pairs' chosen_answer line up only if extraction already canonicalises
    for text in ("Answer: 7.50", "\\boxed{1,234}", "-0.0", "x = 3", "\\boxed{\\dfrac{1}{2}}"):
        a = extract_answer(text)
        assert answer_key(a) == a


@pytest.mark.parametrize(
    "gold, expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("work #### -5", "-5"),
        ("42", "42"),
        ("1,000", "1000"),
        (" 7.0 ", "7"),
        ("$18", "18"),
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        ("so the result is \\boxed{5}", "5"),
        ("The answer is 12", "12"),
        (7, "7"),
        (7.0, "7"),
        (0.25, "0.25"),
        (1e-7, "0.0000001"),
        # unparseable: excluded by the caller, never counted correct
        ("see the figure", None),
        ("72 apples and 3 pears", None),
        ("#### ", None),
        ("", None),
        (None, None),
        (True, None),
        (float("nan"), None),
        (float("inf"), None),
    ],
)
def test_parse_gold_number(gold, expected):
    assert parse_gold(gold) == expected


def test_parse_gold_choice_and_exact():
    assert parse_gold("(C)", "choice") == "C" and parse_gold("c", "choice") == "C"
    assert parse_gold("C) Paris", "choice") == "C"
    assert parse_gold("Paris", "choice") is None
    assert parse_gold("  New  York. ", "exact") == "new york"
    assert parse_gold("#### Paris", "exact") == "paris"
    assert parse_gold("", "exact") is None


def test_unparseable_gold_never_matches():
    gold = parse_gold("see the figure")
    assert gold is None and not answers_equal(extract_answer("Answer: 3"), gold)


def test_unknown_answer_type_is_an_error():
    with pytest.raises(ValueError, match="answer_type"):
        extract_answer("Answer: 3", "numeric")


def test_doctests():
    assert doctest.testmod(rewards.answers).failed == 0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.sampled_from(["number", "choice", "exact"]))
def test_fuzz_never_raises(text, kind):
    a = extract_answer(text, kind)
    assert a is None or (isinstance(a, str) and a.strip())
    b = extract_answer(text[::-1], kind)
    assert isinstance(answers_equal(a, b, kind), bool)
    assert not answers_equal(a, None, kind)
    g = parse_gold(text, kind)
    assert g is None or isinstance(g, str)
    if a is not None:
        assert isinstance(answer_key(a, kind), str)


_MATHY = st.text(alphabet="0123456789.,+-/\\{}^$()[] boxedfracsqrtAnswer:is\n*%", max_size=120)


@settings(max_examples=200, deadline=None)
@given(_MATHY, _MATHY)
def test_fuzz_mathy_text(x, y):
    a, b = extract_answer(x), extract_answer(y)
    assert isinstance(answers_equal(a, b), bool)
    if a is not None:
        assert answers_equal(a, a), "an answer equals itself"
