"""Held-out evaluation of one checkpoint, through the sampler.

Answers: greedy, sampled and majority-vote accuracy, and vote consistency (`evaluate`).

Judge quality (`judge_agreement`): Judge quality: agreement with human labels, and self-preference bias, for one checkpoint.

Labelled rows: {"prompt", "response_a", "response_b", "preferred": "a" | "b"}.
- agreement: the judge's mean score picks the labelled winner (a tie earns half credit).
- self_preference: how much more often the judge scores the model's own greedy answer above the
  labelled-preferred reference than below it, in [-1, 1]. The own answer is unlabelled, so a positive
  value is the bias plus any real quality edge: compare it across iterations rather than to zero.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean
from typing import Any

from rewards.answers import answers_equal, extract_answer, parse_gold
from rewards.judge import judge_prompt
from rewards.votes import consistency, majority_answer
from train.algorithms.self_judge import judge
from train.config import ConfigError, Recipe
from train.data import Item, conversation, jsonl_objects
from train.engine import GenParams, Sampler, generate_together, render_prompts

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
    prompt_ids = render_prompts(sampler.tokenizer, [conversation(it, recipe.data) for it, _ in kept])
    sampler.set_adapter(str(adapter) if adapter else None)
    greedy, sampled = generate_together(
        sampler,
        [
            (prompt_ids, GenParams(n=1, temperature=0.0, max_tokens=max_tokens)),
            (
                prompt_ids,
                GenParams(n=ev.num_samples, temperature=ev.temperature, top_p=ev.top_p, max_tokens=max_tokens),
            ),
        ],
        desc="eval",
    )
    acc = sample_acc = maj_acc = cons = 0.0
    lengths, tokens = [], 0
    for (_, gold), g, samples in zip(kept, greedy, sampled):
        acc += answers_equal(extract_answer(g[0].text, kind), gold, kind)
        answers = [extract_answer(s.text, kind) for s in samples]
        sample_acc += sum(answers_equal(a, gold, kind) for a in answers) / len(answers)
        maj_acc += answers_equal(majority_answer(answers, kind), gold, kind)
        cons += consistency(answers, kind)
        lengths.append(len(g[0].token_ids))
        tokens += len(g[0].token_ids) + sum(len(s.token_ids) for s in samples)
    n = len(kept)
    return metrics | {
        "accuracy": acc / n,
        "sample_accuracy": sample_acc / n,
        "majority_accuracy": maj_acc / n,
        "consistency": cons / n,
        "greedy_length": sum(lengths) / n,
        "tokens": tokens,  # completion tokens generated, greedy + sampled (the bench's roofline)
        "prompt_tokens": sum(map(len, prompt_ids)),  # each prompt once
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


# ---- judge quality ---------------------------------------------------------------------------------------------------


def read_labelled_pairs(path: str) -> list[dict[str, Any]]:
    """The judge eval's labelled pairs; a bad line (not UTF-8, not JSON, a missing or mistyped field) names the file
    and line."""
    rows = []
    for n, row in jsonl_objects(path, "judge eval file"):
        for field in ("prompt", "response_a", "response_b", "preferred"):
            if field not in row:
                raise ConfigError(f"{path}:{n}: missing field `{field}`")
        for field in ("prompt", "response_a", "response_b"):
            if not isinstance(row[field], str):
                raise ConfigError(f"{path}:{n}: field `{field}` must be a string, not {type(row[field]).__name__}")
        if row["preferred"] not in ("a", "b"):
            raise ConfigError(f"{path}:{n}: `preferred` must be a or b")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no labelled pairs")
    return rows


def _mean_scores(sampler: Sampler, pairs: list[tuple[str, str]], recipe: Recipe) -> list[float | None]:
    cfg = recipe.meta_rewarding
    params = GenParams(n=cfg.judge_eval_samples, temperature=cfg.judge_temperature, max_tokens=cfg.judge_max_tokens)
    convs = [[{"role": "user", "content": judge_prompt(p, r)}] for p, r in pairs]
    _, scores, _ = judge(sampler, convs, params, cfg.force_verdict, desc="judge eval")
    return [mean(valid) if (valid := [s for s in row if s is not None]) else None for row in scores]


def judge_agreement(sampler: Sampler, adapter: Path | None, path: str, recipe: Recipe) -> dict[str, Any]:
    rows = read_labelled_pairs(path)
    sampler.set_adapter(str(adapter) if adapter else None)
    own = sampler.generate(
        [conversation(r, recipe.data) for r in rows],
        GenParams(n=1, temperature=0.0, max_tokens=recipe.sampling.max_tokens),
        desc="own answers",
    )
    refs = [r[f"response_{r['preferred']}"] for r in rows]
    queries = [(r["prompt"], r["response_a"]) for r in rows] + [(r["prompt"], r["response_b"]) for r in rows]
    queries += [(r["prompt"], o[0].text) for r, o in zip(rows, own)]
    scores = _mean_scores(sampler, queries, recipe)
    n = len(rows)
    sa, sb, s_own = scores[:n], scores[n : 2 * n], scores[2 * n :]
    credit, pref = [], []
    for row, a, b, mine in zip(rows, sa, sb, s_own):
        if a is None or b is None:
            credit.append(0.0)
        else:
            winner = "tie" if a == b else ("a" if a > b else "b")
            credit.append(0.5 if winner == "tie" else float(winner == row["preferred"]))
        ref = a if row["preferred"] == "a" else b
        if mine is not None and ref is not None:
            pref.append((mine > ref) - (mine < ref))
    parsed = [s for s in scores if s is not None]
    return {
        "n": n,
        "judge_agreement": mean(credit) if credit else 0.0,
        "self_preference": mean(pref) if pref else 0.0,
        "judge_parse_rate": len(parsed) / len(scores) if scores else 0.0,
        "own_mean_score": mean(s for s in s_own if s is not None) if any(s is not None for s in s_own) else None,
        "reference_lengths": mean(len(x) for x in refs) if refs else 0.0,
        "own_length": mean(len(o[0].text) for o in own) if own else 0.0,
    }


def format_judge_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'checkpoint':<12}{'agreement':>10}{'self-pref':>11}{'parse':>8}{'own len':>9}{'n':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['checkpoint']:<12}{r['judge_agreement']:>10.3f}{r['self_preference']:>+11.3f}"
            f"{r['judge_parse_rate']:>8.3f}{r['own_length']:>9.0f}{r['n']:>5}"
        )
    return "\n".join(lines)
