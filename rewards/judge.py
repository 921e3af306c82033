"""LLM-as-a-Judge prompts and parsers for Self-Rewarding (Yuan et al., 2024) and Meta-Rewarding (Wu et al., 2024).

The judge scores one response with the additive 5-point rubric and ends with "Score: X"; the meta-judge compares
two judgements of the same response and ends with "Winner: Judgement A|B". Both parsers are total: they return
None rather than raise, and they prefer dropping a judgement to misreading it.
"""

from __future__ import annotations

import re

# The rubric shared by the judge and the meta-judge (Self-Rewarding, Figure 2; Meta-Rewarding, Figure 2).
_RUBRIC = (
    "- Add 1 point if the response is relevant and provides some information related to the user's inquiry, "
    "even if it is incomplete or contains some irrelevant content.\n"
    "- Add another point if the response addresses a substantial portion of the user's question, but does not "
    "completely resolve the query or provide a direct answer.\n"
    "- Award a third point if the response answers the basic elements of the user's question in a useful way, "
    "regardless of whether it seems to have been written by an AI Assistant or if it has elements typically "
    "found in blogs or search results.\n"
    "- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing "
    "the user's question directly and comprehensively, and is well-organized and helpful, even if there is "
    "slight room for improvement in clarity, conciseness or focus.\n"
    "- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI "
    "Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, "
    "engaging, and insightful answer.\n"
)


def _braces(text: str) -> str:
    """Escape literal braces so the rubric survives str.format."""
    return text.replace("{", "{{").replace("}", "}}")


# Self-Rewarding, Figure 2. Placeholders: {prompt}, {response}.
JUDGE_PROMPT = (
    "Review the user's question and the corresponding response using the additive 5-point scoring system "
    "described below. Points are accumulated based on the satisfaction of each criterion:\n"
    + _braces(_RUBRIC)
    + "\nUser: {prompt}\n\n<response>{response}</response>\n\n"
    "After examining the user's instruction and the response:\n"
    "- Briefly justify your total score, up to 100 words.\n"
    "- Conclude with the score using the format: “Score: <total points>”\n"
    "Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. "
    "To evaluate the response in alignment with this additive scoring model, we'll systematically attribute "
    "points based on the outlined criteria."
)

# Meta-Rewarding, Figure 2 (meta-judge), word for word. Placeholders: {prompt}, {response}, {judgement_a},
# {judgement_b}. The paper corrects the meta-judge's position bias numerically (§2.2, the ω weights:
# rewards/judge_pairs.py::position_debias_weights), not in the prompt; an instruction about order or length here
# would change the verdicts those weights and the Elo ranking are computed from.
META_JUDGE_PROMPT = (
    "Review the user's question and the corresponding response, along with two judgments. Determine which "
    "judgment is more accurate according to the rubric provided below. The rubric used for the initial "
    "judgments is as follows:\n" + _braces(_RUBRIC) + "\nUser: {prompt}\n\nResponse: {response}\n\n"
    "Judgment A: {judgement_a}\n\nJudgment B: {judgement_b}\n\n"
    "After examining the original question, response, and both judgments:\n"
    "- Explain which judgment is more accurate according to the original rubric and why. Consider factors "
    "such as adherence to the rubric, accuracy in evaluating the response, and consistency in applying the "
    "criteria.\n"
    "- Conclude with a clear statement of which judgment is better using the format: "
    "“Winner: [Judgement A | Judgement B]”"
)


def judge_prompt(prompt: str, response: str) -> str:
    """The Self-Rewarding judge prompt for one (instruction, response)."""
    return JUDGE_PROMPT.format(prompt=prompt, response=response)


def meta_judge_prompt(prompt: str, response: str, judgement_a: str, judgement_b: str) -> str:
    """The Meta-Rewarding meta-judge prompt: judgement_a is shown first, judgement_b second.

    Both judgements go in as the judge wrote them, "Score: X" included: the paper's Figure 2 template inserts the
    judgements whole, and its Table 5 measures how often the meta-judge prefers the higher-scoring one. Stripping the
    scores (as NeMo-Aligner's unmerged trainer does) is a different method, not the paper's.
    """
    return META_JUDGE_PROMPT.format(prompt=prompt, response=response, judgement_a=judgement_a, judgement_b=judgement_b)


# Markdown a model wraps around labels and values: **Score:** 4, __Score__: 4, Score: `4`, Score: <4>.
# Never put two of these classes next to each other with only optional parts between: on a long run of
# spaces the regex engine would try every split (quadratic time).
_MD = r"[\s*_`#]*"
_VAL = r"[\s*_`#\[<(\"'“]*"
_SEP = r"[:=\-–—]"
# A number with its sign, so "Score: -1" is seen as negative (None) and not read as 1.
_NUM = r"(?P<num>[-−+]?[0-9]+(?:\.[0-9]+)?)"
# "Score" (also "Total score", "Final Score (out of 5)") + separator + optional bracket + number.
# [0-9]+ is greedy, so "Score: 10" is read as 10 (out of range -> None), never as 1.
_SCORE_RE = re.compile(
    r"(?<![A-Za-z0-9])score(?![A-Za-z0-9])(?:"
    + _MD
    + r"\([^()\n]{0,30}\))?"
    + _MD
    + _SEP
    + _VAL
    + _NUM
    + r"(?P<den>\s*/\s*[0-9]+(?:\.[0-9]+)?)?",
    re.IGNORECASE,
)
_TOTAL_POINTS_RE = re.compile(r"(?<![A-Za-z0-9])total\s+points?(?:" + _MD + _SEP + r")?" + _VAL + _NUM, re.IGNORECASE)
_POINTS_RE = re.compile(r"(?<![0-9.])" + _NUM + r"\s+points?(?![A-Za-z])", re.IGNORECASE)
# "X points" is only trusted in the tail: the head may echo the rubric ("Add 1 point if ...").
_POINTS_TAIL_CHARS = 200


def _number(text: str) -> float | None:
    try:
        return float(text.replace("−", "-"))
    except ValueError:  # defensive: the regexes only capture numerals
        return None


def _in_range(value: float | None, max_score: float) -> float | None:
    return value if value is not None and 0.0 <= value <= max_score else None


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    matches = list(pattern.finditer(text))
    return matches[-1] if matches else None


def parse_score(text: str, max_score: float = 5.0) -> float | None:
    """The judge's score in [0, max_score], or None (Self-Rewarding §2.2: "Score: <total points>").

    Strict first: the LAST "Score: X" anywhere. If that one is out of range, negative or has a denominator other
    than max_score ("8/10") the result is None, with no fallback: the judge broke the format and any other number
    in its text is a guess. Only without any "Score: X" do the fallbacks run, each taking its last match:
    "total points: X", "X/5", "X out of 5", then "X points" within the last 200 characters. Number words
    ("Score: five") are not read.
    """
    if not isinstance(text, str):
        return None
    strict = _last(_SCORE_RE, text)
    if strict is not None:
        den = strict.group("den")
        if den is not None and _number(den.strip().lstrip("/").strip()) != float(max_score):
            return None
        return _in_range(_number(strict.group("num")), max_score)
    den = re.escape(f"{max_score:g}") + (r"(?:\.0+)?" if float(max_score).is_integer() else "")
    fallbacks = (
        (_TOTAL_POINTS_RE, text),
        (re.compile(r"(?<![0-9.])" + _NUM + r"\s*/\s*" + den + r"(?![0-9])"), text),
        (re.compile(r"(?<![0-9.])" + _NUM + r"\s+out\s+of\s+" + den + r"(?![0-9])", re.IGNORECASE), text),
        (_POINTS_RE, text[-_POINTS_TAIL_CHARS:]),
    )
    for pattern, haystack in fallbacks:
        match = _last(pattern, haystack)
        if match is not None:
            return _in_range(_number(match.group("num")), max_score)
    return None


_WINNER_RE = re.compile(r"(?<![A-Za-z0-9])winner(?![A-Za-z0-9])", re.IGNORECASE)
# After "Winner": optional "is", separator, markdown and brackets, then "Judgement A" or a bare capital A/B.
# A bare lowercase "a" is not a label ("Winner: a tie"), so the letter is case-sensitive unless "Judgement"
# precedes it.
_LABEL_RE = re.compile(
    r"(?:\s+is)?(?:" + _MD + _SEP + r")?" + _VAL + r"(?:the\s+)?"
    r"(?:judge?ments?\s*(?P<named>[AB])|(?-i:(?P<bare>[AB])))(?![A-Za-z0-9])",
    re.IGNORECASE,
)
# "Winner: [Judgement A | Judgement B]" (the format echoed back) or "A or B": no verdict.
_ALTERNATIVE_RE = re.compile(
    r"[\s*_`\])>\"'”]*(?:\||/|&|\bor\b|\band\b)[\s\[(]*(?:judge?ments?\s*[AB]|(?-i:[AB]))(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_NO_WINNER_RE = re.compile(
    r"(?:\s+is)?(?:" + _MD + _SEP + r")?" + _VAL + r"(?:tie|neither|both|none|equal|draw)\b", re.IGNORECASE
)


def parse_winner(text: str) -> str | None:
    """The meta-judge's verdict, "A" or "B", or None (Meta-Rewarding §2.2: "Winner: [Judgement A | Judgement B]").

    The last "Winner" that is followed by a verdict decides. A verdict naming both judgements, or a tie,
    neither or both, gives None; a "winner" with no label after it ("A is the winner.") is skipped.
    """
    if not isinstance(text, str):
        return None
    for keyword in reversed(list(_WINNER_RE.finditer(text))):
        tail = text[keyword.end() : keyword.end() + 120]
        if _NO_WINNER_RE.match(tail):
            return None
        label = _LABEL_RE.match(tail)
        if label is None:
            continue
        if _ALTERNATIVE_RE.match(tail, label.end()):
            return None
        return (label.group("named") or label.group("bare")).upper()
    return None
