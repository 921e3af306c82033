"""`reward: self_verify`: the policy judges its own answer; no gold answer needed.

In the spirit of Xiong et al. 2025 ("Self-rewarding correction for mathematical reasoning"): the model is shown the
question and a solution and ends its check with `[VERIFY] correct` or `[VERIFY] wrong`. The reward is the share of
verification samples that say correct; a row where no sample gives a verdict is unscorable (None).
It samples through the shared engine, so it judges with whatever adapter the rollout just loaded (the current policy).
Where a gold answer exists it logs agreement with `reward: verifier` on every step (TRL's `log_metric`, plus `stats`
on the callable).

This is NOT Xiong et al.'s method (solution, then self-verification tokens, then a revision only when judged wrong,
trained with gold rewards): it is a self-judged reward, and hackable. So it is marked `self_judged`, and SCoRe gives
no Stage II shaping bonus with it (train/algorithms/score.py): flipping one's own verdict from "wrong" to "correct"
must not pay α.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from rewards.verifier import Reward, completion_text, get_verifier_reward, prompt_text

VERIFY_PROMPT = (
    "Here is a question and a proposed solution.\n\nQuestion: {question}\n\nSolution: {solution}\n\n"
    "Check the solution step by step. End your reply with exactly `[VERIFY] correct` if the final answer is "
    "right, or `[VERIFY] wrong` if it is not."
)
_VERDICT = re.compile(r"\[\s*VERIFY\s*\]\s*\**\s*(correct|wrong|incorrect)", re.IGNORECASE)


def parse_verdict(text: str) -> float | None:
    """1.0 for `[VERIFY] correct`, 0.0 for wrong/incorrect (the last verdict counts), None if there is none."""
    found = _VERDICT.findall(text)
    if not found:
        return None
    return 1.0 if found[-1].lower() == "correct" else 0.0


Generate = Callable[..., list[list[str]]]  # (conversations, *, n, temperature, max_tokens) -> texts per prompt


def get_self_verify_reward(
    generate: Generate | None = None,
    *,
    answer_type: str = "number",
    num_samples: int = 1,
    temperature: float = 0.0,
    max_tokens: int = 256,
    **_: Any,
) -> Reward:
    """`generate` samples from the current policy (the caller wraps its engine): this package never imports one."""
    if generate is None:
        raise ValueError("reward `self_verify` needs a `generate` callable (the policy's sampler)")
    verifier = get_verifier_reward(answer_type)

    def self_verify(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        convs = [
            [{"role": "user", "content": VERIFY_PROMPT.format(question=prompt_text(p), solution=completion_text(c))}]
            for p, c in zip(prompts, completions)
        ]
        outs = generate(convs, n=num_samples, temperature=temperature, max_tokens=max_tokens)
        rewards: list[float | None] = []
        for texts in outs:
            votes = [v for v in (parse_verdict(t) for t in texts) if v is not None]
            rewards.append(sum(votes) / len(votes) if votes else None)
        stats = self_verify.stats
        stats["judged"] += len(rewards)
        stats["parsed"] += sum(r is not None for r in rewards)
        if kwargs.get("answer") is not None:
            gold = verifier(prompts, completions, **kwargs)
            pairs = [(r >= 0.5, g == 1.0) for r, g in zip(rewards, gold) if r is not None and g is not None]
            stats["with_gold"] += len(pairs)
            stats["agree"] += sum(a == b for a, b in pairs)
            log_metric = kwargs.get("log_metric")
            if log_metric is not None and pairs:
                log_metric("self_verify/agreement", sum(a == b for a, b in pairs) / len(pairs))
        return rewards

    self_verify.stats = {"judged": 0, "parsed": 0, "with_gold": 0, "agree": 0}  # type: ignore[attr-defined]
    # The policy grades itself: a shaping bonus on r(y2) − r(y1) would pay it for flipping its own verdict.
    self_verify.self_judged = True  # type: ignore[attr-defined]
    return self_verify
