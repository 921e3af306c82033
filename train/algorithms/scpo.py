"""Self-Consistency Preference Optimization (Prasad et al., 2024), one iteration at a time.

for k in 1..M:
    seed prompts: all, or slice k of a seeded shuffle (data.prompts_per_iteration: new prompts each iteration)
    [scpo.new_problems > 0] write new problems few-shot from the seeds,
        keep those whose k votes agree with share >= τ (§2-3)            -> problems.jsonl
    sample k responses per unlabeled prompt with the current adapter     -> samples.jsonl
    vote: V(y) = #samples whose final answer equals ans(y)               -> votes.jsonl
    pairs: y+ most voted, y- least voted, keep if V(y+) >= τ·k           -> pairs.jsonl
    weighted DPO + NLL, w = (V(y+) - V(y-)) / k, ref = start of iter     -> adapter/
    evaluate on the held-out split                                       -> eval.json
"""

from __future__ import annotations

from collections import Counter, defaultdict
from functools import partial
from statistics import mean
from typing import Any

from rewards.answers import extract_answer, parse_gold
from rewards.votes import build_pair, consistency, majority_answer, vote_counts, vote_threshold_for
from train.algorithms.dpo_iteration import train_dpo_iteration
from train.algorithms.problems import generate_problems, problems_inputs, training_items
from train.data import Item, conversation, iteration_items, load_items
from train.engine import GenParams, render_prompts
from train.errors import StopRun
from train.evaluate import evaluate
from train.loop import ENGINE_KEYS, EVAL_KEYS, PROMPT_KEYS, TRAIN_KEYS, Run, items_digest
from train.runtime import distributed as dist
from train.runtime.artifacts import ChunkLog, map_chunked, read_jsonl, write_json, write_jsonl


def generate_samples(run: Run, k: int, items: list[Item]) -> dict[str, Any]:
    """Sample k answers per prompt, `sampling.batch_size` prompts per call. Each rank takes its shard and appends
    finished chunks to its own partial file (a crash loses at most the chunk being sampled; a prompt counts as done
    only with all k samples; a rerun with another rank count reuses every rank's chunks: artifacts.ChunkLog);
    rank 0 publishes the rows in prompt order."""
    r, cfg = run.recipe, run.recipe.scpo
    log = ChunkLog(
        run.iter_dir(k) / "samples.jsonl",
        lambda row: row["prompt_id"],
        cfg.num_samples,
        shard=dist.rank(),
        num_shards=dist.world_size(),
    )
    params = GenParams(
        n=cfg.num_samples, temperature=r.sampling.temperature, top_p=r.sampling.top_p, max_tokens=r.sampling.max_tokens
    )

    def work(chunk: list[Item]) -> tuple[list[dict[str, Any]], None]:
        prompt_ids = render_prompts(run.sampler.tokenizer, [conversation(it, r.data) for it in chunk])
        outs = run.sampler.generate_ids(prompt_ids, params, desc=f"iter {k} generate")
        rows = [
            {
                "prompt_id": it["id"],
                "prompt": it["prompt"],
                "gold": it.get("answer"),
                "sample": j,
                "text": s.text,
                "num_tokens": len(s.token_ids),
                "finish_reason": s.finish_reason,
                "answer": extract_answer(s.text, r.data.answer_type),
                "prompt_tokens": len(ids),
            }
            for it, ids, samples in zip(chunk, prompt_ids, outs)
            for j, s in enumerate(samples)
        ]
        return rows, None

    map_chunked(log, items, lambda it: it["id"], r.sampling.batch_size, work, start=partial(run.sample_with, k - 1))
    # rank 0's metrics are the phase's
    rows = log.finish_in_order([it["id"] for it in items]) if dist.is_main() else []
    return {
        "samples": len(rows),
        "answer_rate": mean(row["answer"] is not None for row in rows) if rows else 0.0,
        "mean_tokens": mean(row["num_tokens"] for row in rows) if rows else 0.0,
        "truncated_rate": mean(row["finish_reason"] == "length" for row in rows) if rows else 0.0,
        # each prompt once: the model's prefill work, whatever its n samples recomputed (the bench's roofline)
        "prompt_tokens": sum(row.get("prompt_tokens", 0) for row in rows if row["sample"] == 0),
    }


def group_samples(run: Run, k: int) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in read_jsonl(run.iter_dir(k) / "samples.jsonl"):
        groups[row["prompt_id"]].append(row)
    return groups


def vote(run: Run, k: int) -> dict[str, Any]:
    kind = run.recipe.data.answer_type
    rows = []
    for pid, samples in group_samples(run, k).items():
        answers = [s["answer"] for s in samples]
        counts = vote_counts(answers, kind)
        top = majority_answer(answers, kind)
        rows.append(
            {
                "prompt_id": pid,
                "vote_counts": counts,
                "majority": top,
                "majority_votes": counts.get(top, 0) if top else 0,
                "num_samples": len(samples),
                "consistency": consistency(answers, kind),
            }
        )
    write_jsonl(run.iter_dir(k) / "votes.jsonl", rows)
    shares = Counter(round(r["majority_votes"] / r["num_samples"], 3) for r in rows)
    return {
        "prompts": len(rows),
        "consistency": mean(r["consistency"] for r in rows) if rows else 0.0,
        "vote_share_hist": {str(s): c for s, c in sorted(shares.items())},
    }


def build_pairs(run: Run, k: int) -> dict[str, Any]:
    r, cfg = run.recipe, run.recipe.scpo
    kind = r.data.answer_type
    tau = vote_threshold_for(k, cfg.vote_threshold)
    pairs, unparseable_gold = [], 0
    for samples in group_samples(run, k).values():
        first = samples[0]
        gold = None
        if cfg.semi_supervised and first.get("gold") is not None:
            gold = parse_gold(first["gold"], kind)
            if gold is None:  # never let an unparseable label silently fall back to votes
                unparseable_gold += 1
                continue
        pair = build_pair(
            samples,
            len(samples),
            tau,
            kind,
            gold=gold,
            semi_supervised=cfg.semi_supervised,
            min_margin=cfg.min_vote_margin,
        )
        if pair is None:
            continue
        messages = conversation({"prompt": first["prompt"]}, r.data)
        pairs.append({"prompt_id": first["prompt_id"], "prompt": messages, **pair})
    write_jsonl(run.iter_dir(k) / "pairs.jsonl", pairs)
    return {
        "pairs": len(pairs),
        "threshold": tau,
        "mean_weight": mean(p["weight"] for p in pairs) if pairs else 0.0,
        "excluded_unparseable_gold": unparseable_gold,
    }


def train_iteration(run: Run, k: int) -> dict[str, Any]:
    cfg = run.recipe.scpo
    pairs = read_jsonl(run.iter_dir(k) / "pairs.jsonl")
    if not pairs:
        raise StopRun(
            f"iteration {k} produced 0 preference pairs (vote threshold {vote_threshold_for(k, cfg.vote_threshold)}·k); "
            "lower scpo.vote_threshold (or scpo.min_vote_margin), raise scpo.num_samples or use more prompts"
        )
    return train_dpo_iteration(run, k, pairs, cfg.beta, cfg.nll_alpha)


def run_scpo(run: Run) -> None:
    r = run.recipe
    train_items, eval_items = load_items(r.data, r.seed, r.max_prompts)
    train_items = run.fit_context(train_items, "train", r.sampling.max_tokens)
    eval_items = run.fit_context(eval_items, "eval", r.eval.max_tokens or r.sampling.max_tokens)
    slices = [iteration_items(train_items, r.data, k, r.iterations, r.seed) for k in range(1, r.iterations + 1)]
    eval_on = r.eval.enabled and bool(eval_items)
    eval_inputs = dict(reads=PROMPT_KEYS + ENGINE_KEYS + EVAL_KEYS, values={
        "prompts": items_digest(eval_items), "max_tokens": r.eval.max_tokens or r.sampling.max_tokens})  # fmt: skip

    def eval_phase(k: int) -> dict[str, Any]:
        metrics = evaluate(run.sharded_sampler, run.adapter(k), eval_items, r)
        if dist.is_main():
            write_json(run.iter_dir(k) / "eval.json", metrics)
        return metrics

    if eval_on:
        run.phase(0, "eval", run.iter_dir(0) / "eval.json", partial(eval_phase, 0), all_ranks=True, **eval_inputs)
        run.write_metrics(0)
    for k in range(1, r.iterations + 1):
        d = run.iter_dir(k)
        tau = vote_threshold_for(k, r.scpo.vote_threshold)
        sampling = PROMPT_KEYS + ENGINE_KEYS + ("sampling.temperature", "sampling.top_p", "sampling.max_tokens",
                                                "scpo.num_samples")  # fmt: skip
        seeds = slices[k - 1]  # this iteration's seed prompts (data.prompts_per_iteration)
        if r.scpo.new_problems:  # the model writes its own problems (train/algorithms/problems.py)
            inputs = problems_inputs("scpo", train_items, seeds)
            run.phase(k, "problems", d / "problems.jsonl", partial(generate_problems, run, k, train_items, seeds),
                      all_ranks=True, adapter=k - 1, values=inputs["values"] | {"tau": tau},
                      reads=sampling + inputs["reads"])  # fmt: skip
        items = training_items(run, k, r.scpo, seeds)
        run.phase(k, "generate", d / "samples.jsonl", partial(generate_samples, run, k, items), all_ranks=True,
                  reads=sampling, values={"prompts": items_digest(items)},
                  after=("problems",) if r.scpo.new_problems else (), adapter=k - 1)  # fmt: skip
        run.phase(k, "vote", d / "votes.jsonl", partial(vote, run, k), reads=("data.answer_type",), after=("generate",))
        run.phase(k, "pairs", d / "pairs.jsonl", partial(build_pairs, run, k), after=("generate",),
                  reads=("data.answer_type", "scpo.min_vote_margin", "scpo.semi_supervised", "scpo.pairs_per_prompt"),
                  values={"vote_threshold": tau})  # fmt: skip
        run.phase(k, "train", d / "adapter", partial(train_iteration, run, k), all_ranks=True,
                  reads=TRAIN_KEYS + ("scpo.beta", "scpo.nll_alpha"), after=("pairs",), adapter=k - 1)  # fmt: skip
        if eval_on:
            run.phase(k, "eval", d / "eval.json", partial(eval_phase, k), all_ranks=True, adapter=k, **eval_inputs)
        run.write_metrics(k)
