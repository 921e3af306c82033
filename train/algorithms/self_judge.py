"""The model as its own judge and meta-judge, through the shared sampler.

Small models often write a justification and never reach the "Score: X" line the rubric asks for
(SmolLM2-135M: 4% parsed; forced free-form it writes "Score: 100"). With `force_verdict`, a judgement
that does not parse is continued with the verdict's prefix ("...\nScore: " or "...\nWinner: Judgement")
and ONE greedy token constrained to the valid verdicts (0-5, or A/B): the justification stays the
model's, the format is enforced, and the verdict is the model's most likely valid one. Forced
verdicts are counted so their share shows in metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rewards.judge import parse_score, parse_winner
from train.engine import Conversation, GenParams, Sampler, render_prompts

SCORE_PREFIX, SCORE_CHOICES = "\nScore: ", [str(i) for i in range(6)]
WINNER_PREFIX, WINNER_CHOICES = "\nWinner: Judgement", [" A", " B"]


def _force(
    sampler: Sampler,
    convs: list[Conversation],
    texts: list[list[str]],
    parse: Callable[[str], Any],
    prefix: str,
    choices: list[str],
) -> tuple[list[list[str]], int]:
    """Continue every unparsed text with `prefix` + one of `choices`; returns new texts and the forced count."""
    todo = [(i, j) for i, row in enumerate(texts) for j, t in enumerate(row) if parse(t) is None]
    if not todo:
        return texts, 0
    tok = sampler.tokenizer
    allowed = [tok.encode(c, add_special_tokens=False) for c in choices]
    if any(len(ids) != 1 for ids in allowed):
        raise ValueError(f"verdict choices must be single tokens for this tokenizer: {choices}")
    base = render_prompts(tok, [convs[i] for i, _ in todo])
    ids = [b + tok.encode(texts[i][j].rstrip() + prefix, add_special_tokens=False) for b, (i, j) in zip(base, todo)]
    outs = sampler.generate_ids(
        ids,
        GenParams(n=1, temperature=0.0, max_tokens=1, allowed_token_ids=[a[0] for a in allowed]),
        desc="forced verdicts",
    )
    forced = [row[:] for row in texts]
    for (i, j), out in zip(todo, outs):
        forced[i][j] = texts[i][j].rstrip() + prefix + out[0].text
    return forced, len(todo)


def judge(
    sampler: Sampler, convs: list[Conversation], params: GenParams, force_verdict: bool, desc: str = "judge"
) -> tuple[list[list[str]], list[list[float | None]], int]:
    """N judgements per conversation: texts, parsed scores (None = unparseable), forced count."""
    texts = [[s.text for s in out] for out in sampler.generate(convs, params, desc=desc)]
    forced = 0
    if force_verdict:
        texts, forced = _force(sampler, convs, texts, parse_score, SCORE_PREFIX, SCORE_CHOICES)
    return texts, [[parse_score(t) for t in row] for row in texts], forced


def meta_judge(
    sampler: Sampler, convs: list[Conversation], params: GenParams, force_verdict: bool
) -> tuple[list[str | None], int]:
    """One verdict ("A", "B" or None) per comparison, and how many were forced."""
    texts = [[out[0].text] for out in sampler.generate(convs, params, desc="meta-judge")]
    forced = 0
    if force_verdict:
        texts, forced = _force(sampler, convs, texts, parse_winner, WINNER_PREFIX, WINNER_CHOICES)
    return [parse_winner(row[0]) for row in texts], forced
