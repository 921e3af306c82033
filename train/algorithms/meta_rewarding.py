"""Meta-Rewarding (Wu et al., 2024) and, with `meta_judge: false`, Self-Rewarding LMs (Yuan et al., 2024).

One model, three roles, one engine and one adapter:

    for k in 1..M:
        seed prompts: all, or slice k of a seeded shuffle (data.prompts_per_iteration)
        [new_problems > 0] self-instruction creation (Self-Rewarding §2.3): new
          prompts written few-shot from the seeds, Self-Instruct's filters   -> problems.jsonl
        actor: K responses per prompt                                        -> responses.jsonl
        judge: N judgements per response, "Score: X" parsed, mean kept      -> judgements.jsonl
        actor pairs: best vs worst score (length-controlled window ρ_k)     -> actor_pairs.jsonl
        meta-judge: the response whose scores vary most; its scored judgements
          compared pairwise in both orders, debiased, Elo-ranked; the pair
          dropped if its chosen judgement is over-long                      -> judge_pairs.jsonl
        DPO on actor pairs (+ judge pairs in the scheduled iterations)      -> adapter/
        judge quality on a labelled set                                      -> eval.json
"""

from __future__ import annotations

from collections import Counter, defaultdict
from functools import partial
from itertools import permutations
from pathlib import Path
from statistics import mean, pvariance
from typing import Any

from rewards.judge import judge_prompt, meta_judge_prompt
from rewards.judge_pairs import (
    battle_matrix,
    elo_scores,
    meta_judge_candidates,
    pick_meta_judge_response,
    rho_for,
    select_actor_pair,
    select_judge_pair,
)
from train.algorithms.dpo_iteration import train_dpo_iteration
from train.algorithms.problems import problems_inputs, training_items
from train.algorithms.self_instruct import generate_instructions
from train.algorithms.self_judge import judge, meta_judge
from train.algorithms.sft_seed import run_sft_seed
from train.data import conversation, iteration_items, load_items
from train.engine import GenParams, render_prompts
from train.errors import StopRun
from train.evaluate import judge_agreement
from train.loop import ENGINE_KEYS, PROMPT_KEYS, TRAIN_KEYS, Run, items_digest
from train.runtime import distributed as dist
from train.runtime.artifacts import ChunkLog, map_chunked, read_jsonl, write_json, write_jsonl
from train.runtime.fingerprints import digest


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _rank_log(path: Path, key: Any, need: int = 1) -> ChunkLog:
    """This rank's partial file of the artifact at `path` (artifacts.ChunkLog: every rank reads all of them)."""
    return ChunkLog(path, key, need, shard=dist.rank(), num_shards=dist.world_size())


def generate_responses(run: Run, k: int, items: list[dict[str, Any]]) -> dict[str, Any]:
    """K responses per prompt. Data-parallel (each rank samples its shard of prompts) and crash-safe: every chunk of
    `sampling.batch_size` prompts is appended to the rank's partial file once sampled, and a rerun samples only the
    prompts that have no complete chunk yet. Rank 0 publishes the rows in prompt order."""
    r, cfg = run.recipe, run.recipe.meta_rewarding
    params = GenParams(
        n=cfg.num_responses,
        temperature=r.sampling.temperature,
        top_p=r.sampling.top_p,
        max_tokens=r.sampling.max_tokens,
    )
    log = _rank_log(run.iter_dir(k) / "responses.jsonl", lambda row: row["prompt_id"], cfg.num_responses)

    def work(chunk: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], None]:
        prompt_ids = render_prompts(run.sampler.tokenizer, [conversation(it, r.data) for it in chunk])
        outs = run.sampler.generate_ids(prompt_ids, params, desc=f"iter {k} actor")
        rows = [
            {
                "prompt_id": it["id"],
                "prompt": it["prompt"],
                "response_idx": j,
                "text": s.text,
                "length": len(s.text),
                "num_tokens": len(s.token_ids),
                "finish_reason": s.finish_reason,
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
        "responses": len(rows),
        "mean_length": mean(x["length"] for x in rows) if rows else 0.0,
        "truncated_rate": mean(x["finish_reason"] == "length" for x in rows) if rows else 0.0,
        # token counts as ScPO's generate phase records them, for the bench's roofline (scripts/roofline.py)
        "samples": len(rows),
        "mean_tokens": mean(x["num_tokens"] for x in rows) if rows else 0.0,
        "prompt_tokens": sum(x.get("prompt_tokens", 0) for x in rows if x["response_idx"] == 0),  # each prompt once
    }


def judge_responses(run: Run, k: int) -> dict[str, Any]:
    """N judgements per response, `sampling.batch_size` responses per call; unparseable scores are kept as null.
    Data-parallel and crash-safe as `generate_responses`: one unit per response."""
    cfg = run.recipe.meta_rewarding
    responses = read_jsonl(run.iter_dir(k) / "responses.jsonl")
    params = GenParams(
        n=cfg.num_judgements, temperature=cfg.judge_temperature, top_p=1.0, max_tokens=cfg.judge_max_tokens
    )

    def unit(x: dict[str, Any]) -> tuple[Any, int]:
        return x["prompt_id"], x["response_idx"]

    log = _rank_log(run.iter_dir(k) / "judgements.jsonl", unit)

    def work(chunk: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        convs = [_user(judge_prompt(x["prompt"], x["text"])) for x in chunk]
        texts, scores, forced = judge(run.sampler, convs, params, cfg.force_verdict, desc=f"iter {k} judge")
        rows = []
        for x, row_texts, row_scores in zip(chunk, texts, scores):
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
        return rows, {"forced": forced}

    map_chunked(log, responses, unit, run.recipe.sampling.batch_size, work, start=partial(run.sample_with, k - 1))
    rows, forced = [], 0
    if dist.is_main():  # rank 0's metrics are the phase's
        done, metas = log.collect()
        rows = [done[unit(x)][0] for x in responses]
        forced = sum(m.get("forced", 0) for m in metas)
        log.finish(rows)
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
    """Meta-judge (Meta-Rewarding §2.2): for each prompt, the response whose judge scores vary most; every ordered pair
    of its scored judgements compared, shown as written (no score stripped); Elo; one judge pair per prompt at most,
    dropped if its chosen judgement is longer than `max_judgement_chars`. See rewards/judge_pairs.py for what the
    paper does not do (equal-score filter, score stripping, a cap on the judge pairs' share)."""
    cfg = run.recipe.meta_rewarding
    picked = []
    for group in _by_prompt(run, k).values():
        idx = pick_meta_judge_response([j["scores"] for _, j in group])
        if idx is not None:
            picked.append(group[idx])
    jobs = []  # (prompt_id, a, b, conversation): one comparison of judgements a and b
    for x, j in picked:
        for a, b in permutations(meta_judge_candidates(j["scores"]), 2):
            conv = _user(meta_judge_prompt(x["prompt"], x["text"], j["judge_texts"][a], j["judge_texts"][b]))
            jobs.append((x["prompt_id"], a, b, conv))
    params = GenParams(n=1, temperature=cfg.judge_temperature, top_p=1.0, max_tokens=cfg.judge_max_tokens)

    def unit(job: tuple[Any, int, int, Any]) -> tuple[Any, int, int]:
        return job[:3]

    # Data-parallel and crash-safe over comparisons, as `generate_responses` over prompts.
    log = _rank_log(run.iter_dir(k) / "judge_pairs.jsonl", lambda row: (row["prompt_id"], row["a"], row["b"]))

    def work(chunk: list[tuple[Any, int, int, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        verdicts, forced = meta_judge(run.sampler, [c for *_, c in chunk], params, cfg.force_verdict)
        rows = [{"prompt_id": p, "a": a, "b": b, "winner": w} for (p, a, b, _), w in zip(chunk, verdicts)]
        return rows, {"forced": forced}

    map_chunked(log, jobs, unit, run.recipe.sampling.batch_size, work, start=partial(run.sample_with, k - 1))
    if not dist.is_main():
        return {}  # rank 0's metrics are the phase's
    done, metas = log.collect()
    verdicts = [done[unit(job)][0]["winner"] for job in jobs]
    forced = sum(m.get("forced", 0) for m in metas)
    outcomes: dict[str, list[tuple[int, int, str | None]]] = defaultdict(list)
    for (pid, a, b, _), winner in zip(jobs, verdicts):
        outcomes[pid].append((a, b, winner))
    pairs, long_chosen = [], 0
    for x, j in picked:
        texts, scores = j["judge_texts"], j["scores"]
        elo = elo_scores(battle_matrix(len(texts), outcomes[x["prompt_id"]]))
        pair = select_judge_pair(texts, scores, elo, cfg.max_judgement_chars)
        if pair is None:
            # counted apart: the paper's length threshold is the knob that decides how many of these are lost
            long_chosen += select_judge_pair(texts, scores, elo, None) is not None
            continue
        pairs.append({"prompt_id": x["prompt_id"], "prompt": _user(judge_prompt(x["prompt"], x["text"])), **pair})
    log.finish(pairs)
    return {
        "meta_forced_verdicts": forced,
        "judge_pairs": len(pairs),
        "judge_pairs_dropped_long_chosen": long_chosen,
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
    slices = [iteration_items(items, r.data, k, r.iterations, r.seed) for k in range(1, r.iterations + 1)]
    labelled = cfg.judge_eval_file
    judging = ("meta_rewarding.judge_temperature", "meta_rewarding.judge_max_tokens", "meta_rewarding.force_verdict")
    eval_inputs = dict(  # the labelled file's content, not only its name
        reads=PROMPT_KEYS + ENGINE_KEYS + judging + ("sampling.max_tokens", "meta_rewarding.judge_eval_samples"),
        values={"labelled": digest(Path(labelled).read_bytes().decode(errors="replace")) if labelled else None},
    )

    def eval_phase(k: int) -> dict[str, Any]:
        metrics = judge_agreement(run.sharded_sampler, run.adapter(k), labelled, r)
        if dist.is_main():
            write_json(run.iter_dir(k) / "eval.json", metrics)
        return metrics

    run_sft_seed(run)  # with `sft.enabled`: M1 = SFT(M0) in iter_0/adapter, where iteration 1 starts (sft_seed.py)
    if r.eval.enabled and labelled:  # iteration 0's eval: the model iteration 1 starts from (the SFT model, if any)
        run.phase(0, "eval", run.iter_dir(0) / "eval.json", partial(eval_phase, 0), all_ranks=True, adapter=0,
                  **eval_inputs)  # fmt: skip
        run.write_metrics(0)
    for k in range(1, r.iterations + 1):
        d = run.iter_dir(k)
        use_judge = cfg.meta_judge and k in cfg.judge_pair_iterations
        seeds = slices[k - 1]  # this iteration's seed prompts (data.prompts_per_iteration)
        if cfg.new_problems:  # self-instruction creation (Self-Rewarding §2.3): train/algorithms/self_instruct.py
            inputs = problems_inputs("meta_rewarding", items, seeds)
            run.phase(k, "problems", d / "problems.jsonl", partial(generate_instructions, run, k, items, seeds),
                      all_ranks=True, adapter=k - 1, values=inputs["values"],
                      reads=ENGINE_KEYS + ("sampling.top_p", "sampling.max_tokens") + inputs["reads"])  # fmt: skip
        prompts = training_items(run, k, cfg, seeds)
        run.phase(k, "generate", d / "responses.jsonl", partial(generate_responses, run, k, prompts), all_ranks=True,
                  reads=PROMPT_KEYS + ENGINE_KEYS + ("sampling.temperature", "sampling.top_p", "sampling.max_tokens",
                                                     "meta_rewarding.num_responses"),
                  values={"prompts": items_digest(prompts)}, after=("problems",) if cfg.new_problems else (),
                  adapter=k - 1)  # fmt: skip
        run.phase(k, "judge", d / "judgements.jsonl", partial(judge_responses, run, k), all_ranks=True,
                  reads=ENGINE_KEYS + judging + ("meta_rewarding.num_judgements",), after=("generate",),
                  adapter=k - 1)  # fmt: skip
        run.phase(k, "actor_pairs", d / "actor_pairs.jsonl", partial(build_actor_pairs, run, k), after=("judge",),
                  reads=("meta_rewarding.length_control",),
                  values={"rho": rho_for(k, cfg.length_rho) if cfg.length_control else 0.0})  # fmt: skip
        train_after: tuple[str, ...] = ("actor_pairs",)
        if use_judge:
            run.phase(k, "meta_judge", d / "judge_pairs.jsonl", partial(build_judge_pairs, run, k), all_ranks=True,
                      reads=ENGINE_KEYS + judging + ("meta_rewarding.max_judgement_chars",), after=("judge",),
                      adapter=k - 1)  # fmt: skip
            train_after += ("meta_judge",)
        run.phase(k, "train", d / "adapter", partial(train_iteration, run, k, use_judge), all_ranks=True,
                  reads=TRAIN_KEYS + ("meta_rewarding.beta",), values={"judge_pairs": use_judge}, after=train_after,
                  adapter=k - 1)  # fmt: skip
        if r.eval.enabled and labelled:
            run.phase(k, "eval", d / "eval.json", partial(eval_phase, k), all_ranks=True, adapter=k, **eval_inputs)
        run.write_metrics(k)
