"""Meta-Rewarding (Wu et al., 2024) and, with `meta_judge: false`, Self-Rewarding LMs (Yuan et al., 2024).

One model, three roles, one engine and one adapter:

    for k in 1..M:
        actor: K responses per prompt                                        -> responses.jsonl
        judge: N judgements per response, "Score: X" parsed, mean kept      -> judgements.jsonl
        actor pairs: best vs worst score (length-controlled window ρ_k)     -> actor_pairs.jsonl
        meta-judge: the response whose scores vary most; its judgements
          compared pairwise in both orders, debiased, Elo-ranked            -> judge_pairs.jsonl
        DPO on actor pairs (+ judge pairs in the scheduled iterations)      -> adapter/
        judge quality on a labelled set                                      -> eval.json
"""

from __future__ import annotations

from collections import Counter, defaultdict
from functools import partial
from itertools import permutations
from statistics import mean, pvariance
from typing import Any

from rewards.judge import judge_prompt, meta_judge_prompt
from rewards.judge_pairs import (
    battle_matrix,
    elo_scores,
    pick_meta_judge_response,
    rho_for,
    select_actor_pair,
    select_judge_pair,
)
from train.algorithms.dpo_iteration import train_dpo_iteration
from train.algorithms.self_judge import judge, meta_judge
from train.data import conversation, load_items
from train.engine import GenParams
from train.errors import StopRun
from train.evaluate import judge_agreement
from train.loop import Run
from train.runtime import distributed as dist
from train.runtime.artifacts import read_jsonl, write_json, write_jsonl


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def generate_responses(run: Run, k: int, items: list[dict[str, Any]]) -> dict[str, Any]:
    r, cfg = run.recipe, run.recipe.meta_rewarding
    run.sampler.set_adapter(str(run.adapter(k - 1)) if run.adapter(k - 1) else None)
    params = GenParams(
        n=cfg.num_responses,
        temperature=r.sampling.temperature,
        top_p=r.sampling.top_p,
        max_tokens=r.sampling.max_tokens,
    )
    # data-parallel: each rank samples its shard of prompts (the phase runs on all ranks)
    outs = dist.map_sharded(
        lambda part: run.sampler.generate([conversation(it, r.data) for it in part], params, desc=f"iter {k} actor"),
        items,
    )
    rows = [
        {
            "prompt_id": it["id"],
            "prompt": it["prompt"],
            "response_idx": j,
            "text": s.text,
            "length": len(s.text),
            "num_tokens": len(s.token_ids),
            "finish_reason": s.finish_reason,
        }
        for it, samples in zip(items, outs)
        for j, s in enumerate(samples)
    ]
    if dist.is_main():
        write_jsonl(run.iter_dir(k) / "responses.jsonl", rows)
    return {
        "responses": len(rows),
        "mean_length": mean(x["length"] for x in rows) if rows else 0.0,
        "truncated_rate": mean(x["finish_reason"] == "length" for x in rows) if rows else 0.0,
    }


def judge_responses(run: Run, k: int) -> dict[str, Any]:
    """N judgements per response in one batched call; unparseable scores are kept as null."""
    cfg = run.recipe.meta_rewarding
    responses = read_jsonl(run.iter_dir(k) / "responses.jsonl")
    params = GenParams(
        n=cfg.num_judgements, temperature=cfg.judge_temperature, top_p=1.0, max_tokens=cfg.judge_max_tokens
    )
    convs = [_user(judge_prompt(x["prompt"], x["text"])) for x in responses]
    run.sampler.set_adapter(str(run.adapter(k - 1)) if run.adapter(k - 1) else None)
    forced_here = []

    def judge_part(part: list[Any]) -> list[tuple[list[str], list[float | None]]]:
        texts, scores, forced = judge(run.sampler, part, params, cfg.force_verdict, desc=f"iter {k} judge")
        forced_here.append(forced)
        return list(zip(texts, scores))

    judged = dist.map_sharded(judge_part, convs)  # data-parallel over responses
    texts, scores = [t for t, _ in judged], [s for _, s in judged]
    forced = sum(dist.gather_rows(forced_here))
    rows = []
    for x, row_texts, row_scores in zip(responses, texts, scores):
        valid = [s for s in row_scores if s is not None]
        rows.append(
            {
                "prompt_id": x["prompt_id"],
                "response_idx": x["response_idx"],
                "judge_texts": row_texts,
                "scores": row_scores,
                "mean_score": mean(valid) if valid else None,
            }
        )
    if dist.is_main():
        write_jsonl(run.iter_dir(k) / "judgements.jsonl", rows)
    all_scores = [s for row in rows for s in row["scores"]]
    parsed = [s for s in all_scores if s is not None]
    return {
        "judge_parse_rate": len(parsed) / len(all_scores) if all_scores else 0.0,
        "score_mean": mean(parsed) if parsed else None,
        "score_std": pvariance(parsed) ** 0.5 if len(parsed) > 1 else 0.0,
        "score_hist": {str(s): c for s, c in sorted(Counter(round(s) for s in parsed).items())},
        "all_null_responses": sum(row["mean_score"] is None for row in rows),
        "forced_verdicts": forced,
    }


def _by_prompt(run: Run, k: int) -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    judged = {(j["prompt_id"], j["response_idx"]): j for j in read_jsonl(run.iter_dir(k) / "judgements.jsonl")}
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for x in read_jsonl(run.iter_dir(k) / "responses.jsonl"):
        groups[x["prompt_id"]].append((x, judged[(x["prompt_id"], x["response_idx"])]))
    return groups


def build_actor_pairs(run: Run, k: int) -> dict[str, Any]:
    r, cfg = run.recipe, run.recipe.meta_rewarding
    rho = rho_for(k, cfg.length_rho) if cfg.length_control else 0.0
    pairs = []
    groups = _by_prompt(run, k)
    for group in groups.values():
        texts = [x["text"] for x, _ in group]
        pair = select_actor_pair(texts, [j["mean_score"] for _, j in group], rho, cfg.length_control)
        if pair is not None:
            prompt = group[0][0]["prompt"]
            pairs.append(
                {"prompt_id": group[0][0]["prompt_id"], "prompt": conversation({"prompt": prompt}, r.data), **pair}
            )
    write_jsonl(run.iter_dir(k) / "actor_pairs.jsonl", pairs)
    return {
        "actor_pairs": len(pairs),
        "rho": rho,
        "prompts_without_pair": len(groups) - len(pairs),
        "chosen_length": mean(p["chosen_length"] for p in pairs) if pairs else 0.0,
        "rejected_length": mean(p["rejected_length"] for p in pairs) if pairs else 0.0,
    }


def build_judge_pairs(run: Run, k: int) -> dict[str, Any]:
    """Meta-judge: compare every pair of one response's judgements in both orders, then Elo."""
    cfg = run.recipe.meta_rewarding
    picked = []
    for group in _by_prompt(run, k).values():
        idx = pick_meta_judge_response([j["scores"] for _, j in group])
        if idx is not None:
            picked.append(group[idx])
    jobs, convs = [], []
    for x, j in picked:
        usable = [i for i, t in enumerate(j["judge_texts"]) if len(t) <= cfg.max_judgement_chars]
        for a, b in permutations(usable, 2):
            jobs.append((x["prompt_id"], a, b))
            convs.append(_user(meta_judge_prompt(x["prompt"], x["text"], j["judge_texts"][a], j["judge_texts"][b])))
    params = GenParams(n=1, temperature=cfg.judge_temperature, top_p=1.0, max_tokens=cfg.judge_max_tokens)
    run.sampler.set_adapter(str(run.adapter(k - 1)) if run.adapter(k - 1) else None)
    forced_here = []

    def meta_judge_part(part: list[Any]) -> list[str | None]:
        verdicts, forced = meta_judge(run.sampler, part, params, cfg.force_verdict) if part else ([], 0)
        forced_here.append(forced)
        return verdicts

    verdicts = dist.map_sharded(meta_judge_part, convs)  # data-parallel over comparisons
    forced = sum(dist.gather_rows(forced_here))
    outcomes: dict[str, list[tuple[int, int, str | None]]] = defaultdict(list)
    for (pid, a, b), winner in zip(jobs, verdicts):
        outcomes[pid].append((a, b, winner))
    pairs = []
    for x, j in picked:
        n = len(j["judge_texts"])
        elo = elo_scores(battle_matrix(n, outcomes[x["prompt_id"]]))
        pair = select_judge_pair(j["judge_texts"], j["scores"], elo, cfg.max_judgement_chars)
        if pair is not None:
            pairs.append({"prompt_id": x["prompt_id"], "prompt": _user(judge_prompt(x["prompt"], x["text"])), **pair})
    if dist.is_main():
        write_jsonl(run.iter_dir(k) / "judge_pairs.jsonl", pairs)
    return {
        "meta_forced_verdicts": forced,
        "judge_pairs": len(pairs),
        "meta_comparisons": len(verdicts),
        "meta_parse_rate": mean(w is not None for w in verdicts) if verdicts else 0.0,
        "meta_first_position_rate": mean(w == "A" for w in verdicts if w) if any(verdicts) else 0.0,
    }


def train_iteration(run: Run, k: int, use_judge_pairs: bool) -> dict[str, Any]:
    cfg = run.recipe.meta_rewarding
    keep = ("prompt", "chosen", "rejected")
    pairs = [{f: p[f] for f in keep} for p in read_jsonl(run.iter_dir(k) / "actor_pairs.jsonl")]
    n_actor = len(pairs)
    if use_judge_pairs:
        pairs += [{f: p[f] for f in keep} for p in read_jsonl(run.iter_dir(k) / "judge_pairs.jsonl")]
    if not pairs:
        raise StopRun(
            f"iteration {k} produced 0 preference pairs; every judge score may be null or equal "
            "(see judgements.jsonl); raise meta_rewarding.num_responses or judge_max_tokens"
        )
    metrics = train_dpo_iteration(run, k, pairs, cfg.beta, 0.0)
    return metrics | {"train_actor_pairs": n_actor, "train_judge_pairs": len(pairs) - n_actor}


def run_meta_rewarding(run: Run) -> None:
    r, cfg = run.recipe, run.recipe.meta_rewarding
    items, _ = load_items(r.data, r.seed, r.max_prompts)
    items = run.fit_context(items, "train", r.sampling.max_tokens)  # over-long judge prompts: see skip_overlong
    labelled = cfg.judge_eval_file

    def eval_phase(k: int) -> dict[str, Any]:
        metrics = judge_agreement(run.sharded_sampler, run.adapter(k), labelled, r)
        if dist.is_main():
            write_json(run.iter_dir(k) / "eval.json", metrics)
        return metrics

    if r.eval.enabled and labelled:
        run.phase(0, "eval", run.iter_dir(0) / "eval.json", partial(eval_phase, 0), all_ranks=True)
        run.write_metrics(0)
    for k in range(1, r.iterations + 1):
        d = run.iter_dir(k)
        use_judge = cfg.meta_judge and k in cfg.judge_pair_iterations
        run.phase(k, "generate", d / "responses.jsonl", partial(generate_responses, run, k, items), all_ranks=True)
        run.phase(k, "judge", d / "judgements.jsonl", partial(judge_responses, run, k), all_ranks=True)
        run.phase(k, "actor_pairs", d / "actor_pairs.jsonl", partial(build_actor_pairs, run, k))
        if use_judge:
            run.phase(k, "meta_judge", d / "judge_pairs.jsonl", partial(build_judge_pairs, run, k), all_ranks=True)
        run.phase(k, "train", d / "adapter", partial(train_iteration, run, k, use_judge), all_ranks=True)
        if r.eval.enabled and labelled:
            run.phase(k, "eval", d / "eval.json", partial(eval_phase, k), all_ranks=True)
        run.write_metrics(k)
