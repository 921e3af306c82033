"""`reward: verifier`: 1.0 when the completion's final answer equals the gold answer, else 0.0.

A plain callable with TRL's reward signature `f(prompts, completions, **kwargs) -> list[float | None]`; the gold
answers arrive as the dataset column `answer`. A row without a parseable gold answer is unscorable (None): TRL turns
it into NaN and gives it no advantage, rather than calling it wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rewards.answers import answers_equal, extract_answer, parse_gold

Reward = Callable[..., list[float | None]]


def completion_text(completion: Any) -> str:
    """TRL passes a string (standard) or a list of messages (conversational); return the assistant's text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion[-1]["content"]) if completion else ""


def prompt_text(prompt: Any) -> str:
    """The question: the last user message of a conversation, or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def verifier_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    answer: Sequence[Any] | None = None,
    answer_type: str = "number",
    **kwargs: Any,
) -> list[float | None]:
    golds = list(answer) if answer is not None else [None] * len(completions)
    out: list[float | None] = []
    for completion, raw in zip(completions, golds):
        gold = parse_gold(raw, answer_type) if raw is not None else None
        if gold is None:
            out.append(None)
            continue
        pred = extract_answer(completion_text(completion), answer_type)
        out.append(1.0 if pred is not None and answers_equal(pred, gold, answer_type) else 0.0)
    return out


def get_verifier_reward(answer_type: str = "number", **_: Any) -> Reward:
    """Factory used by the registry; extra context (e.g. `generate`) is ignored."""

    def verifier(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return verifier_reward(prompts, completions, answer_type=answer_type, **kwargs)

    return verifier
