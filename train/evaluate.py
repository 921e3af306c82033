"""Held-out accuracy: greedy, sampled, majority-vote, and vote consistency, through the sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewards.answers import answers_equal, extract_answer, parse_gold
from rewards.votes import consistency, majority_answer
from train.config import Recipe
from train.data import Item, conversation
from train.sampling import GenParams, Sampler

EVAL_KEYS = ("accuracy", "sample_accuracy", "majority_accuracy", "consistency")


def evaluate(sampler: Sampler, adapter: Path | None, items: list[Item], recipe: Recipe) -> dict[str, Any]:
    """Metrics for one checkpoint; items whose gold answer does not parse are excluded and counted."""
    kind = recipe.data.answer_type
    golds = [parse_gold(it.get("answer"), kind) for it in items]
    kept = [(it, g) for it, g in zip(items, golds) if g is not None]
    metrics: dict[str, Any] = {"n": len(kept), "excluded_unparseable_gold": len(items) - len(kept)}
    if not kept:
        return metrics | {k: 0.0 for k in EVAL_KEYS}
    ev = recipe.eval
    max_tokens = ev.max_tokens or recipe.sampling.max_tokens
    convs = [conversation(it, recipe.data) for it, _ in kept]
    sampler.set_adapter(str(adapter) if adapter else None)
    greedy = sampler.generate(convs, GenParams(n=1, temperature=0.0, max_tokens=max_tokens), desc="eval greedy")
    sampled = sampler.generate(
        convs,
        GenParams(n=ev.num_samples, temperature=ev.temperature, top_p=ev.top_p, max_tokens=max_tokens),
        desc="eval sampled",
    )
    acc = sample_acc = maj_acc = cons = 0.0
    lengths = []
    for (_, gold), g, samples in zip(kept, greedy, sampled):
        acc += answers_equal(extract_answer(g[0].text, kind), gold, kind)
        answers = [extract_answer(s.text, kind) for s in samples]
        sample_acc += sum(answers_equal(a, gold, kind) for a in answers) / len(answers)
        maj_acc += answers_equal(majority_answer(answers, kind), gold, kind)
        cons += consistency(answers, kind)
        lengths.append(len(g[0].token_ids))
    n = len(kept)
    return metrics | {
        "accuracy": acc / n,
        "sample_accuracy": sample_acc / n,
        "majority_accuracy": maj_acc / n,
        "consistency": cons / n,
        "greedy_length": sum(lengths) / n,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'checkpoint':<12}{'greedy':>9}{'sampled':>9}{'maj@k':>9}{'consist.':>10}{'n':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['checkpoint']:<12}{r['accuracy']:>9.3f}{r['sample_accuracy']:>9.3f}"
            f"{r['majority_accuracy']:>9.3f}{r['consistency']:>10.3f}{r['n']:>6}"
        )
    return "\n".join(lines)
