"""The model writes its own problems (ScPO, Prasad et al. 2024, §2 "Generating New Problems", §3 "Preference
Training Data").

For iteration k, until `scpo.new_problems` are kept or `scpo.problem_candidates` were tried, in chunks of
`sampling.batch_size`:
    write: the model is shown `scpo.problem_exemplars` seed questions (drawn at random) and asked for a new one
    dedupe: a candidate whose normalised text equals a seed's or any earlier iteration's problem is dropped
    vote: k = `scpo.num_samples` answers per candidate, as in the generate phase
    filter: kept only if its most-voted answer has a vote share ≥ τ_k (this iteration's `scpo.vote_threshold`),
            ScPO's filter for generated problems (§3: the model's own votes agree enough)
-> iter_<k>/problems.jsonl: id, prompt, origin ("generated"), vote_share, majority, exemplar ids.

Readings taken: the paper filters generated problems by the same vote-share threshold as the pairs; we apply the
iteration's τ. The paper writes problems with a fixed Llama-3 Instruct 8B; we use the model being trained (the current
adapter), which keeps the loop self-contained. Exemplars are sampled with the run's seed and the iteration, so a
rerun writes the same prompts.
Self-Rewarding's self-instruction creation (Yuan et al. 2024, §3.2) is the same idea with its own filter; it is not
wired into Meta-/Self-Rewarding yet.
"""

from __future__ import annotations

import random
import re
from statistics import mean
from typing import Any

from rewards.answers import extract_answer
from rewards.votes import majority_answer, vote_counts, vote_threshold_for
from train.data import Item, conversation
from train.engine import GenParams
from train.loop import Run
from train.runtime import distributed as dist
from train.runtime.artifacts import read_jsonl, write_jsonl

WRITE_PROMPT = (
    "Here are some example problems.\n\n{examples}\n\n"
    "Write one new problem of the same kind and difficulty. Reply with the problem only, nothing else."
)
_ARITHMETIC = re.compile(r"what is (-?\d+) ([+-]) (-?\d+)\s*\?", re.IGNORECASE)


def normalise(text: str) -> str:
    """Case, spacing and trailing punctuation do not make a problem new."""
    return " ".join(text.lower().split()).rstrip(" .?!")


def clean_problem(text: str) -> str | None:
    """The first non-empty paragraph, without a leading `Problem:` label; None if nothing usable is left."""
    for block in text.strip().split("\n\n"):
        line = re.sub(r"^\s*(new\s+)?problem\s*\d*\s*:\s*", "", block.strip(), flags=re.IGNORECASE).strip()
        if len(line) >= 3:
            return line
    return None


def arithmetic_truth(question: str) -> str | None:
    """For the synthetic a ± b data: the right answer of a well-formed generated question, else None."""
    m = _ARITHMETIC.search(question)
    if not m:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b)


def _earlier_problems(run: Run, k: int) -> list[str]:
    return [row["prompt"] for j in range(1, k) if (run.iter_dir(j) / "problems.jsonl").is_file()
            for row in read_jsonl(run.iter_dir(j) / "problems.jsonl")]  # fmt: skip


def generate_problems(run: Run, k: int, seeds: list[Item]) -> dict[str, Any]:
    """Write, dedupe, vote and filter new problems for iteration k (every rank samples in lockstep; rank 0 writes)."""
    r, cfg = run.recipe, run.recipe.scpo
    sampler = run.sharded_sampler
    sampler.set_adapter(str(run.adapter(k - 1)) if run.adapter(k - 1) else None)
    tau = vote_threshold_for(k, cfg.vote_threshold)
    rng = random.Random(r.seed * 1000 + k)  # the same draws on every rank and on a rerun
    seen = {normalise(it["prompt"]) for it in seeds} | {normalise(p) for p in _earlier_problems(run, k)}
    write = GenParams(
        n=1, temperature=cfg.problem_temperature, top_p=r.sampling.top_p, max_tokens=r.sampling.max_tokens
    )
    answer = GenParams(n=cfg.num_samples, temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                       max_tokens=r.sampling.max_tokens)  # fmt: skip
    kept: list[dict[str, Any]] = []
    tried = duplicates = unusable = 0
    while len(kept) < cfg.new_problems and tried < cfg.problem_candidates:
        size = min(r.sampling.batch_size, cfg.problem_candidates - tried)
        shots = [rng.sample(seeds, min(cfg.problem_exemplars, len(seeds))) for _ in range(size)]
        convs = [[{"role": "user", "content": WRITE_PROMPT.format(
            examples="\n\n".join(f"Problem: {it['prompt']}" for it in shot))}] for shot in shots]  # fmt: skip
        tried += size
        candidates = []
        for shot, (sample,) in zip(shots, sampler.generate(convs, write, desc=f"iter {k} write problems")):
            question = clean_problem(sample.text)
            if question is None:
                unusable += 1
            elif normalise(question) in seen:
                duplicates += 1
            else:
                seen.add(normalise(question))
                candidates.append((question, [it["id"] for it in shot]))
        votes = sampler.generate([conversation({"prompt": q}, r.data) for q, _ in candidates], answer,
                                 desc=f"iter {k} vote on problems")  # fmt: skip
        for (question, exemplars), samples in zip(candidates, votes):
            answers = [extract_answer(s.text, r.data.answer_type) for s in samples]
            top = majority_answer(answers, r.data.answer_type)
            share = vote_counts(answers, r.data.answer_type).get(top, 0) / len(answers) if top is not None else 0.0
            if share >= tau and len(kept) < cfg.new_problems:
                kept.append({"id": f"gen-{k}-{len(kept)}", "prompt": question, "origin": "generated",
                             "vote_share": share, "majority": top, "exemplars": exemplars})  # fmt: skip
    if dist.is_main():
        write_jsonl(run.iter_dir(k) / "problems.jsonl", kept)
    metrics: dict[str, Any] = {"kept": len(kept), "candidates": tried, "duplicates": duplicates,
                               "unusable": unusable, "threshold": tau,
                               "mean_vote_share": mean(p["vote_share"] for p in kept) if kept else 0.0}  # fmt: skip
    if r.data.source == "arithmetic":  # the demo's problems can be checked: well-formed, and is the majority right?
        truths = [arithmetic_truth(p["prompt"]) for p in kept]
        formed = [(p, t) for p, t in zip(kept, truths) if t is not None]
        metrics["well_formed_rate"] = len(formed) / len(kept) if kept else 0.0
        metrics["majority_correct_rate"] = mean(p["majority"] == t for p, t in formed) if formed else 0.0
    return metrics


def training_items(run: Run, k: int, seeds: list[Item]) -> list[Item]:
    """What iteration k samples and votes on: its kept generated problems, plus the seed prompts if configured."""
    cfg, path = run.recipe.scpo, run.iter_dir(k) / "problems.jsonl"
    if not cfg.new_problems or not path.is_file():  # off, or `selfreward status` before the phase ran
        return seeds
    generated = [{"id": p["id"], "prompt": p["prompt"], "answer": None}
                 for p in read_jsonl(path)]  # fmt: skip
    return (seeds if cfg.seed_problems else []) + generated
