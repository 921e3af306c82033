"""Self-Rewarding's self-instruction creation (Yuan et al. 2024, arXiv 2401.10020, §2.3 "Self-Instruction Creation"):
the model writes a new prompt few-shot from the seed instruction data; then N candidate responses are sampled and
judged by the same model (the generate and judge phases of train/algorithms/meta_rewarding.py, unchanged).

The filter is the paper's: §3.2 writes prompts "following Self-Instruct" with its template and "the same filtering
techniques, including the ROUGE-L similarity check, keyword filtering, and length filtering". Those are Self-Instruct's
(Wang et al. 2023; `post_process_gpt3_response` and the ROUGE-L loop of yizhongw/self-instruct's
bootstrap_instructions.py), reproduced here:
    length: drop an instruction of ≤ 3 or > 150 words
    keyword: drop one naming something a text model cannot handle (image, graph, picture, file, map, draw, plot, go to)
    program: drop one starting "Write a program"; drop one starting with punctuation or a non-ASCII character
    similarity: drop one whose ROUGE-L F-measure with any seed prompt or any earlier kept prompt is > 0.7
plus the dedupe of train/algorithms/problems.py. There is no answer-agreement filter (an instruction has no gold
answer and the judge needs none); the paper's later filter, a pair only where the judge's scores differ, is the actor
pair selection's (`select_actor_pair` returns none when best and worst scores are equal).

Readings taken: the paper writes prompts with a fixed Llama 2-Chat 70B, 8-shot (6 seed + 2 model-written
demonstrations), T = 0.6, p = 0.9; we use the model being trained and `problem_exemplars` seed demonstrations
(problems.py says why), and set the writing temperature with `meta_rewarding.problem_temperature`. The sections quoted
are from the arXiv text as read by the authors; this project's search tools reached only the paper's opening.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from train.algorithms.problems import earlier_problems, write_problems
from train.data import Item
from train.loop import Run

KEYWORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
            "plot", "go to")  # fmt: skip
_KEYWORD = re.compile(r"\b(" + "|".join(KEYWORDS) + r")\b", re.IGNORECASE)
MAX_ROUGE_L = 0.7


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer (no stemming): lower case, runs of [a-z0-9] as tokens."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two token lists: the longest common subsequence over both lengths (symmetric)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 2 * lcs / (len(a) + len(b))  # F with P = lcs/|a|, R = lcs/|b|


def too_similar(tokens: list[str], existing: list[list[str]], limit: float = MAX_ROUGE_L) -> bool:
    """ROUGE-L > `limit` with any of `existing`. The LCS is at most the shared-token count, so most pairs are ruled
    out by a Counter before the quadratic LCS."""
    bag = Counter(tokens)
    for other in existing:
        shared = sum((bag & Counter(other)).values())
        if 2 * shared / (len(tokens) + len(other) or 1) > limit and rouge_l(tokens, other) > limit:
            return True
    return False


def rejection(text: str) -> str | None:
    """Why Self-Instruct's text filters drop this instruction (`length`, `keyword`, `program`, `punctuation`,
    `non_ascii`), or None if they keep it."""
    text = " ".join(text.split())
    words = len(text.split())
    if words <= 3 or words > 150:
        return "length"
    if _KEYWORD.search(text):
        return "keyword"
    if text.capitalize().startswith("Write a program"):  # Self-Instruct capitalises before this check
        return "program"
    if text[0] in string.punctuation:
        return "punctuation"
    if not text[0].isascii():
        return "non_ascii"
    return None


def generate_instructions(run: Run, k: int, pool: list[Item], seeds: list[Item]) -> dict[str, Any]:
    """Self-/Meta-Rewarding's problems phase: new instructions written few-shot, kept by Self-Instruct's filters."""
    existing = [rouge_tokens(t) for t in [it["prompt"] for it in pool] + earlier_problems(run, k)]
    dropped: Counter[str] = Counter()

    def self_instruct_filter(texts: list[str]) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = []
        for text in texts:
            tokens = rouge_tokens(text)
            why = rejection(text) or ("similar" if too_similar(tokens, existing) else None)
            dropped[why or "kept"] += 1
            if why is None:
                existing.append(tokens)  # later candidates are compared with it, as Self-Instruct's pool grows
            out.append(None if why else {})
        return out

    _, metrics = write_problems(run, k, run.recipe.meta_rewarding, pool, seeds, "instruction", self_instruct_filter)
    reasons = ("length", "keyword", "program", "punctuation", "non_ascii", "similar")
    return metrics | {f"dropped_{why}": dropped[why] for why in reasons}
