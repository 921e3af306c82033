"""Final-answer extraction and equivalence, shared by votes, evaluation and verifier rewards.

Three answer types: "number" (\\boxed{} / "Answer:" clause / last number, math-verify equivalence),
"choice" (a letter A-E) and "exact" (normalised string after "Answer:").

>>> extract_answer("so 3 + 4 = 7. Answer: 7")
'7'
>>> extract_answer(r"we get \\boxed{\\frac{1}{2}}")
'\\\\frac{1}{2}'
>>> answers_equal("0.5", "1/2")
True
"""

from __future__ import annotations

import math
import re
import threading
from decimal import Decimal

ANSWER_TYPES = ("number", "choice", "exact")

# ASCII digits only: \d would accept other scripts' digits, which float() reads but nobody writes as an answer.
# A sign counts only when it does not follow a word or a closing bracket, so "10-20" ends in 20, not -20.
_NUMBER = r"(?:(?<![\w)\]}])[-+])?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?|(?<![0-9])\.[0-9]+)"
_NUM_RE = re.compile(_NUMBER)
_PLAIN_NUM_RE = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")  # a number once commas are gone
_FRACTION_RE = re.compile(rf"({_NUMBER})\s*/\s*([0-9]+)(?![0-9]|\.[0-9])")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "Answer: 42", "The answer is 42", "**Final Answer:** 42", "answer = 42"; the clause is captured in a lookahead
# so that a later "answer is" inside it is still found as its own clause.
_CLAUSE_RE = re.compile(r"\banswer\**\s*(?:is\b|would be\b|:|=)\s*:?\s*(?=([^\n]{0,200}))", re.IGNORECASE)
_MATH_DELIMS_RE = re.compile(r"\$+((?:\\\$|[^$])+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]")  # $..$ may hold \$
# Decorations around a number that do not change it: currency, percent, degrees, a \text{unit}.
_UNITS_RE = re.compile(r"^(?:\\\$|\$)|(?:\\%|%|\^\s*\{?\\circ\}?|°|\\(?:text|mbox|mathrm)\{[^{}]*\})+$")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")
_TEXT_RE = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}")
_MAX_VERIFY = 200  # math-verify parses with sympy: skip it on long strings so it stays fast and cannot hang

_CHOICE_CLAUSE_RE = re.compile(r"\b(?i:answer|option|choice)\**\s*(?:(?i:is)\b|:|=)?\s*:?\s*\**\s*\(?([A-E])\b")
_CHOICE_PAREN_RE = re.compile(r"\(([A-Ea-e])\)")
_CHOICE_BOLD_RE = re.compile(r"\*\*\s*\(?([A-Ea-e])\)?[.:]?\s*\*\*")
_CHOICE_BARE_RE = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")
_EXACT_CLAUSE_RE = re.compile(r"\banswer\**\s*:\**", re.IGNORECASE)


def _check_type(answer_type: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")


def normalize_number(text: str) -> str:
    """Canonical spelling of a plain number; anything else comes back stripped.

    >>> [normalize_number(s) for s in ("1,234", "7.0", "+7", "-0", "007", ".5")]
    ['1234', '7', '7', '0', '7', '0.5']
    """
    s = text.replace(",", "").strip()
    m = re.fullmatch(r"([-+]?)([0-9]*)(?:\.([0-9]*))?", s)
    if not m or not (m.group(2) or m.group(3)):
        return s
    whole, frac = m.group(2).lstrip("0") or "0", (m.group(3) or "").rstrip("0")
    out = whole + ("." + frac if frac else "")
    return "-" + out if m.group(1) == "-" and out != "0" else out


def _latex_canon(expr: str) -> str:
    """Cheap spelling fixes for a LaTeX answer: \\dfrac -> \\frac, no \\left/\\right, no spaces between symbols."""
    s = re.sub(r"\\[dt]frac", r"\\frac", expr)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    # Keep a space only between two letters ("\\pi r" must not become "\\pir").
    s = re.sub(r"\s+(?![A-Za-z])|(?<![A-Za-z])\s+", "", s)
    return re.sub(r"\s+", " ", s).strip()


def _looks_like_math(expr: str) -> bool:
    """No prose words once LaTeX commands and \\text{} are gone, and something to evaluate."""
    s = _LATEX_CMD_RE.sub("", _TEXT_RE.sub("", expr))
    return not _WORD_RE.search(s) and bool(re.search(r"[0-9\\]", expr))


def _clean_expression(expr: str) -> str | None:
    """A boxed or delimited answer: a plain number (units and currency dropped) or a canonical LaTeX string."""
    s = expr.strip().strip("$").strip()
    s = re.sub(r"\\[,!; ]", "", s)  # LaTeX spacing, as in 1\,234
    bare = _UNITS_RE.sub("", s).replace(" ", "")
    if _PLAIN_NUM_RE.fullmatch(bare.replace(",", "")) and (
        "," not in bare or re.fullmatch(r"[-+]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?", bare)
    ):
        return normalize_number(bare)
    s = _latex_canon(s).rstrip(".")
    return s or None


def _last_boxed(text: str) -> str | None:
    """Contents of the last balanced \\boxed{...} (nested braces allowed); None if there is none."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts[-3:]):  # a few tries only: an unbalanced tail must not cost O(n^2)
        depth = 1
        for j in range(start, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:j]
    return None


def _from_clause(clause: str) -> str | None:
    """The number or expression that opens an "Answer:" clause; the first number in it otherwise."""
    clause = clause.strip().lstrip("*` ").strip()
    m = _MATH_DELIMS_RE.match(clause)
    if m and _looks_like_math(next(g for g in m.groups() if g is not None)):  # "$18 and $20" is prose
        return _clean_expression(next(g for g in m.groups() if g is not None))
    if clause.startswith("\\") and not clause.startswith("\\$"):  # bare LaTeX such as \frac{1}{2}
        depth, end = 0, len(clause)
        for j, ch in enumerate(clause):
            depth += (ch == "{") - (ch == "}")
            if ch.isspace() and depth <= 0:
                end = j
                break
        return _clean_expression(clause[:end].rstrip(".,;:*"))
    # Only the clause's first sentence: in "the answer is clear. Step 3" the 3 is not the answer.
    clause = re.split(r"[.!?;](?=\s|$)", clause, maxsplit=1)[0]
    num = _NUM_RE.search(clause)
    if num is None:
        return None
    frac = _FRACTION_RE.match(clause, num.start())
    if frac:  # "1/2" is an answer, not the number 1
        return f"{normalize_number(frac.group(1))}/{frac.group(2)}"
    return normalize_number(num.group(0))


def _extract_number(text: str, last_number: bool = True) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        cleaned = _clean_expression(boxed)
        if cleaned is not None:
            return cleaned
    # The last clause that yields something wins: "Answer: 42 ... I hope the answer is clear" is 42.
    for clause in reversed(_CLAUSE_RE.findall(text)[-8:]):  # a few tries bound the cost on degenerate text
        found = _from_clause(clause)
        if found is not None:
            return found
    if not last_number:
        return None
    nums = _NUM_RE.findall(text)
    return normalize_number(nums[-1]) if nums else None


def _extract_choice(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        letter = re.sub(r"\\text\{([^{}]*)\}", r"\1", boxed).strip(" ()$.")
        if len(letter) == 1 and letter.upper() in "ABCDE":
            return letter.upper()
    found = _CHOICE_CLAUSE_RE.findall(text)
    if found:
        return found[-1]
    found = _CHOICE_BOLD_RE.findall(text)
    if found:
        return found[-1].upper()
    lone = text.strip().strip("()*.:$ ")
    if len(lone) == 1 and lone.upper() in "ABCDE":
        return lone.upper()
    found = _CHOICE_PAREN_RE.findall(text)
    if found:
        return found[-1].upper()
    # Last resort: a standalone capital on the last line, except the article in "A good idea".
    last_line = text.strip().splitlines()[-1]
    for m in reversed(list(_CHOICE_BARE_RE.finditer(last_line))):
        after = last_line[m.end() :]
        if m.group(1) == "A" and re.match(r"\s+[a-z]", after) and not re.match(r"\s+(?:is|was)\b", after):
            continue
        return m.group(1)
    return None


def _normalize_exact(raw: str) -> str | None:
    out = " ".join(raw.strip().strip("*`").lower().split())
    out = out.rstrip(".!?,;: ").strip("*`\"' ").rstrip(".!?,;: ")
    return out or None


def _extract_exact(text: str) -> str | None:
    markers = list(_EXACT_CLAUSE_RE.finditer(text))
    if markers:
        lines = [ln for ln in text[markers[-1].end() :].splitlines() if ln.strip()]
        return _normalize_exact(lines[0]) if lines else None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return _normalize_exact(lines[-1]) if lines else None


def extract_answer(text: str, answer_type: str = "number") -> str | None:
    """The final answer in `text`, normalised; None when there is none. Never raises on a string.

    >>> extract_answer("The total is 1,234 apples.")
    '1234'
    >>> extract_answer("Answer: (B)", "choice"), extract_answer("Answer:  New   York.", "exact")
    ('B', 'new york')
    """
    _check_type(answer_type)
    if not isinstance(text, str) or not text.strip():
        return None
    if answer_type == "choice":
        return _extract_choice(text)
    if answer_type == "exact":
        return _extract_exact(text)
    return _extract_number(text)


def parse_gold(answer: str | int | float | None, answer_type: str = "number") -> str | None:
    """Normalise a gold label; None when it does not parse, so the caller excludes it (never counted correct).

    Stricter than `extract_answer`: a gold number must be a number, a \\boxed{} / "Answer:" value or a math
    expression; free text such as "see the figure" is not mined for a stray number.

    >>> parse_gold("Natalia sold 48 + 24 = 72 clips.\\n#### 72"), parse_gold(7.0), parse_gold("see the figure")
    ('72', '7', None)
    """
    _check_type(answer_type)
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        if isinstance(answer, float) and not math.isfinite(answer):
            return None
        if answer_type == "number":
            return normalize_number(format(Decimal(repr(answer)), "f"))
        answer = str(answer)
    text = str(answer)
    if "####" in text:  # GSM8K: the reasoning, then "#### 72"
        text = text.rsplit("####", 1)[1]
    if not text.strip():
        return None
    if answer_type == "choice":
        return _extract_choice(text)
    if answer_type == "exact":
        return _extract_exact(text) if _EXACT_CLAUSE_RE.search(text) else _normalize_exact(text)
    whole = _clean_expression(text)
    if whole is not None and _PLAIN_NUM_RE.fullmatch(whole):
        return whole
    found = _extract_number(text, last_number=False)
    if found is not None:
        return found
    # A bare expression such as \frac{1}{2} or 3\sqrt{2}; words mean prose, which is not a label.
    if whole is not None and _looks_like_math(whole):
        return whole
    return None


def answer_key(answer: str, answer_type: str = "number") -> str:
    """Canonical key that groups equal answers in a vote; cheap (no sympy).

    >>> answer_key("7.00") == answer_key("7") == "7", answer_key("\\\\dfrac{1}{2}")
    (True, '\\\\frac{1}{2}')
    """
    _check_type(answer_type)
    if answer_type != "number":
        return answer
    s = answer.strip()
    if not _PLAIN_NUM_RE.fullmatch(s.replace(",", "")):
        return _latex_canon(s)
    value = float(s.replace(",", ""))
    r = repr(value)
    # repr is the shortest round-trip spelling; past ~17 digits (exponent form) keep the digits as written.
    return normalize_number(r) if "e" not in r and "inf" not in r else normalize_number(s)


def _is_plain_number(s: str) -> bool:
    return bool(_PLAIN_NUM_RE.fullmatch(s.strip().replace(",", "")))


def _math_verify_equal(a: str, b: str) -> bool:
    if len(a) > _MAX_VERIFY or len(b) > _MAX_VERIFY:
        return False
    # math-verify's timeout is signal.alarm, which only works on the main thread. Elsewhere it runs without one,
    # so skip the inputs that can make sympy explode (towers of powers, factorials, binomials).
    on_main = threading.current_thread() is threading.main_thread()
    if not on_main and any(t in a + b for t in ("^", "!", "**", "binom")):
        return False
    timeout = 1 if on_main else None  # seconds; simple expressions take milliseconds
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError:
        return False
    try:
        gold = parse(f"${b.strip('$')}$", parsing_timeout=timeout)
        pred = parse(f"${a.strip('$')}$", parsing_timeout=timeout)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # exotic input: unequal is the safe answer
        return False


def answers_equal(a: str | None, b: str | None, answer_type: str = "number") -> bool:
    """Whether two extracted answers are the same; None equals nothing, not even None.

    >>> answers_equal("\\\\frac{1}{2}", "0.5"), answers_equal("7", "7.00"), answers_equal(None, None)
    (True, True, False)
    """
    _check_type(answer_type)
    if a is None or b is None:
        return False
    if answer_type != "number":
        return a == b
    if answer_key(a) == answer_key(b):
        return True
    if _is_plain_number(a) and _is_plain_number(b):
        return False  # two plain numbers with different keys differ; no need for sympy
    return _math_verify_equal(a, b)
