"""The model writes its own prompts: the `problems` phase shared by ScPO (Prasad et al. 2024, arXiv 2411.04109, §2
"Generating New Problems", §3 "Preference Training Data") and Self-/Meta-Rewarding (Yuan et al. 2024, arXiv 2401.10020,
§2.3 "Self-Instruction Creation", §3.2; train/algorithms/self_instruct.py).

For iteration k, until `<section>.new_problems` are kept or `<section>.problem_candidates` were tried, in chunks of
`sampling.batch_size`:
    write: the model is shown `problem_exemplars` seed prompts (drawn at random from the whole seed pool) and asked
           for a new one
    dedupe: a candidate whose normalised text equals a seed's or any earlier iteration's prompt is dropped
    filter: the algorithm's own (`Keep`): ScPO votes k = `scpo.num_samples` answers per candidate and keeps it only if
            its most-voted answer has a vote share ≥ τ_k (this iteration's `scpo.vote_threshold`; §3: the model's own
            votes agree enough); Self-Rewarding applies Self-Instruct's filters (self_instruct.py)
-> iter_<k>/problems.jsonl, one row per prompt iteration k trains on: id, prompt, origin ("seed" for the iteration's
   seed prompts when `seed_problems`, then "generated"), exemplars (ids of the seed prompts shown; [] for seeds), and
   what the filter adds (ScPO: vote_share, majority).

Readings taken: the paper filters generated problems by the same vote-share threshold as the pairs; we apply the
iteration's τ. Both papers write prompts with a fixed model (ScPO: Llama-3 Instruct 8B; Self-Rewarding: Llama 2-Chat
70B); we use the model being trained (the current adapter), which keeps the loop self-contained. Exemplars are sampled
with the run's seed and the iteration, so a rerun writes the same prompts. The paper texts were reached only in part
through this project's search tools (abstracts); the sections cited are from the arXiv versions as read by the authors.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from statistics import mean
from typing import Any

from rewards.answers import extract_answer
from rewards.votes import majority_answer, vote_counts, vote_threshold_for
from train.config.problem_writing import ProblemWriting
from train.data import Item, conversation
from train.engine import GenParams
from train.loop import Run, items_digest
from train.runtime import distributed as dist
from train.runtime.artifacts import read_jsonl, write_jsonl

WRITE_PROMPT = (
    "Here are some example {kind}s.\n\n{examples}\n\n"
    "Write one new {kind} of the same kind and difficulty. Reply with the {kind} only, nothing else."
)
_ARITHMETIC = re.compile(r"what is (-?\d+) ([+-]) (-?\d+)\s*\?", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(new\s+)?(problem|instruction|task)\s*\d*\s*:\s*", re.IGNORECASE)
# The algorithm's filter: for a chunk of new candidate prompts, the columns to store with each kept one, None if dropped.
Keep = Callable[[list[str]], list[dict[str, Any] | None]]


def normalise(text: str) -> str:
    """Case, spacing and trailing punctuation do not make a problem new."""
    return " ".join(text.lower().split()).rstrip(" .?!")


def clean_problem(text: str) -> str | None:
    """The first non-empty paragraph, without a leading `Problem:`/`Instruction:` label; None if nothing usable."""
    for block in text.strip().split("\n\n"):
        line = _LABEL.sub("", block.strip()).strip()
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


def earlier_problems(run: Run, k: int) -> list[str]:
    """Every prompt listed by iterations 1..k-1's problems phases (generated and seed)."""
    return [row["prompt"] for j in range(1, k) if (run.iter_dir(j) / "problems.jsonl").is_file()
            for row in read_jsonl(run.iter_dir(j) / "problems.jsonl")]  # fmt: skip


def write_problems(
    run: Run, k: int, cfg: ProblemWriting, pool: list[Item], seeds: list[Item], kind: str, keep: Keep
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write, dedupe and filter (`keep`) new prompts for iteration k, then publish problems.jsonl: `seeds` (this
    iteration's seed prompts) when `cfg.seed_problems`, then the kept ones. Every rank samples in lockstep; rank 0
    writes. Exemplars come from the whole seed `pool`. Returns the kept rows and the phase's counts."""
    r = run.recipe
    run.sharded_sampler.set_adapter(str(run.adapter(k - 1)) if run.adapter(k - 1) else None)
    rng = random.Random(r.seed * 1000 + k)  # the same draws on every rank and on a rerun
    seen = {normalise(it["prompt"]) for it in pool} | {normalise(p) for p in earlier_problems(run, k)}
    write = GenParams(n=1, temperature=cfg.problem_temperature, top_p=r.sampling.top_p,
                      max_tokens=r.sampling.max_tokens)  # fmt: skip
    kept: list[dict[str, Any]] = []
    tried = duplicates = unusable = 0
    while len(kept) < cfg.new_problems and tried < cfg.problem_candidates:
        size = min(r.sampling.batch_size, cfg.problem_candidates - tried)
        shots = [rng.sample(pool, min(cfg.problem_exemplars, len(pool))) for _ in range(size)]
        convs = [[{"role": "user", "content": WRITE_PROMPT.format(kind=kind, examples="\n\n".join(
            f"{kind.capitalize()}: {it['prompt']}" for it in shot))}] for shot in shots]  # fmt: skip
        tried += size
        candidates = []
        for shot, (sample,) in zip(shots, run.sharded_sampler.generate(convs, write, desc=f"iter {k} write {kind}s")):
            text = clean_problem(sample.text)
            if text is None:
                unusable += 1
            elif normalise(text) in seen:
                duplicates += 1
            else:
                seen.add(normalise(text))
                candidates.append((text, [it["id"] for it in shot]))
        for (text, exemplars), extra in zip(candidates, keep([t for t, _ in candidates])):
            if extra is not None and len(kept) < cfg.new_problems:
                kept.append({"id": f"gen-{k}-{len(kept)}", "prompt": text, "origin": "generated",
                             "exemplars": exemplars, **extra})  # fmt: skip
    seed_rows = [{"id": it["id"], "prompt": it["prompt"], "origin": "seed", "exemplars": []}
                 for it in (seeds if cfg.seed_problems else [])]  # fmt: skip
    if dist.is_main():
        write_jsonl(run.iter_dir(k) / "problems.jsonl", seed_rows + kept)
    return kept, {"kept": len(kept), "candidates": tried, "duplicates": duplicates, "unusable": unusable,
                  "seed_prompts": len(seed_rows)}  # fmt: skip


def generate_problems(run: Run, k: int, pool: list[Item], seeds: list[Item]) -> dict[str, Any]:
    """ScPO's problems phase: written few-shot, kept when the model's k votes on it agree with share ≥ τ_k (§2-3)."""
    r, cfg = run.recipe, run.recipe.scpo
    tau = vote_threshold_for(k, cfg.vote_threshold)
    answer = GenParams(n=cfg.num_samples, temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                       max_tokens=r.sampling.max_tokens)  # fmt: skip

    def vote_filter(questions: list[str]) -> list[dict[str, Any] | None]:
        votes = run.sharded_sampler.generate([conversation({"prompt": q}, r.data) for q in questions], answer,
                                             desc=f"iter {k} vote on problems")  # fmt: skip
        out: list[dict[str, Any] | None] = []
        for samples in votes:
            answers = [extract_answer(s.text, r.data.answer_type) for s in samples]
            top = majority_answer(answers, r.data.answer_type)
            share = vote_counts(answers, r.data.answer_type).get(top, 0) / len(answers) if top is not None else 0.0
            out.append({"vote_share": share, "majority": top} if share >= tau else None)
        return out

    kept, metrics = write_problems(run, k, cfg, pool, seeds, "problem", vote_filter)
    metrics |= {"threshold": tau, "mean_vote_share": mean(p["vote_share"] for p in kept) if kept else 0.0}
    if r.data.source == "arithmetic":  # the demo's problems can be checked: well-formed, and is the majority right?
        truths = [arithmetic_truth(p["prompt"]) for p in kept]
        formed = [(p, t) for p, t in zip(kept, truths) if t is not None]
        metrics["well_formed_rate"] = len(formed) / len(kept) if kept else 0.0
        metrics["majority_correct_rate"] = mean(p["majority"] == t for p, t in formed) if formed else 0.0
    return metrics


def training_items(run: Run, k: int, cfg: ProblemWriting, seeds: list[Item]) -> list[Item]:
    """What iteration k samples on: its seed prompts if configured, plus its kept generated prompts (no gold answer)."""
    path = run.iter_dir(k) / "problems.jsonl"
    if not cfg.new_problems or not path.is_file():  # off, or `selfreward status` before the phase ran
        return seeds
    generated = [{"id": p["id"], "prompt": p["prompt"], "answer": None}
                 for p in read_jsonl(path) if p["origin"] == "generated"]  # fmt: skip
    return (seeds if cfg.seed_problems else []) + generated


def problems_inputs(section: str, pool: list[Item], seeds: list[Item]) -> dict[str, Any]:
    """The problems phase's fingerprint inputs shared by every algorithm (the caller adds its filter's)."""
    keys = ("new_problems", "seed_problems", "problem_exemplars", "problem_candidates", "problem_temperature")
    return {"reads": tuple(f"{section}.{key}" for key in keys),
            "values": {"prompts": items_digest(pool), "seeds": items_digest(seeds)}}  # fmt: skip
