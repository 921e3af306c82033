"""Per-step cost of top-p on CPU (train/engine/vllm_cpu_sampler.py) on a language model's own decode logits.

One process, back to back on the same tensor: vLLM's sort of every row (`apply_top_k_top_p_pytorch`), one
`topk(1024)` (the fast path before the tiers), and the tiers (`CANDIDATES`: 64, then 1,024 for the rows 64 did not
decide, then vLLM's sort); then a whole sampling step as vLLM-CPU takes it (`sample_step_s`): the tiers'
masked logits and vLLM's Gumbel-max over the vocabulary (`TopKTopPSampler.forward_cpu`), against our `forward_cpu`,
which draws from the kept candidates; and the same without top-p (temperature alone): vLLM's Gumbel-max over the
vocabulary against `sample_from_top_k_or_tail`. The tensor: SmolLM2's logits at the decode steps of its own sampled answers to the bench's
arithmetic prompts (HF `generate`, T and top-p as the CPU recipes sample), rows of unfinished answers drawn to a
[256 x 49152] step, divided by T as vLLM's sampler does before top-p. `make bench` records it as `top_p`; alone:
`.venv/bin/python scripts/bench_top_p.py` (about 30 s on the 2-core box).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROWS, TEMPERATURE, TOP_P, NEW_TOKENS, REPEATS = 256, 0.7, 0.9, 24, 5


def decode_logits(model_path: str, prompt_ids: list[list[int]], rows: int = ROWS, seed: int = 0) -> Any:
    """[rows x vocab] float32 logits / T of the decode steps where an answer was still running."""
    import torch

    from train.models import load_causal_lm

    torch.manual_seed(seed)
    model = load_causal_lm(model_path).eval()
    width = max(len(ids) for ids in prompt_ids)  # left padding, as decoder-only generation wants
    input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in prompt_ids])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                             top_p=TOP_P, max_new_tokens=NEW_TOKENS, num_return_sequences=4, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=eos if isinstance(eos, int) else eos[0])  # fmt: skip
    steps = torch.stack(out.logits, dim=1).float()  # [sequences, steps, vocab]
    new = out.sequences[:, width:]
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else eos)
    finished_before = torch.isin(new, eos_ids).long().cumsum(1) - torch.isin(new, eos_ids).long()  # eos step counts
    running = steps[finished_before == 0]  # [decode steps of running answers, vocab]
    pick = torch.randint(len(running), (rows,), generator=torch.Generator().manual_seed(seed))
    return running[pick] / TEMPERATURE


def _time(fn: Any, logits: Any, repeats: int) -> tuple[float, Any]:
    runs, out = [], None
    for _ in range(repeats):
        x = logits.clone()
        t0 = time.perf_counter()
        out = fn(x)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), out


def bench_top_p(model_path: str, prompt_ids: list[list[int]], repeats: int = REPEATS) -> dict[str, Any]:
    import torch
    import vllm._custom_ops  # noqa: F401  (torch.ops._C: vLLM's Gumbel-max kernel)
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler, apply_top_k_top_p_pytorch

    from train.engine import vllm_cpu_sampler
    from train.engine.vllm_cpu_sampler import CANDIDATES, apply_top_k_top_p, top_p_from_top_k

    logits = decode_logits(model_path, prompt_ids)
    p = torch.full((logits.shape[0],), TOP_P)
    methods = {
        "vllm_sort": lambda x: apply_top_k_top_p_pytorch(x, None, p, allow_cpu_sync=True),
        "topk_1024": lambda x: apply_top_k_top_p(x, None, p, candidates=(1024,)),
        "tiers": lambda x: apply_top_k_top_p(x, None, p),
    }
    seconds, kept = {}, {}
    for name, fn in methods.items():
        seconds[name], out = _time(fn, logits, repeats)
        kept[name] = torch.isfinite(out)
    decided = {k: round(float(top_p_from_top_k(logits, p, k)[1].float().mean()), 4) for k in CANDIDATES}
    vllm_cpu_sampler.install()  # as our vLLM plugin does: forward_cpu hands vLLM's own the rows it leaves
    sampler = TopKTopPSampler("raw_logprobs")
    seeds = lambda x: torch.randint(0, 2**31, (x.shape[0],), dtype=torch.long)  # noqa: E731  (as vLLM draws them)
    steps = {
        "tiers_then_vllm_gumbel": lambda x: torch.ops._C.fused_gumbel_argmax(apply_top_k_top_p(x, None, p), seeds(x)),
        "from_candidates": lambda x: vllm_cpu_sampler.forward_cpu(sampler, x, {}, None, p)[0],
        # temperature alone (no top-p; the eval's sampled answers, the judges): vLLM's Gumbel-max over the vocabulary
        "no_top_p_vllm_gumbel": lambda x: torch.ops._C.fused_gumbel_argmax(x, seeds(x)),
        "no_top_p_top_k_or_tail": lambda x: vllm_cpu_sampler.forward_cpu(sampler, x, {}, None, None)[0],
    }
    sample_s = {name: _time(fn, logits, repeats)[0] for name, fn in steps.items()}
    return {
        "shape": list(logits.shape),
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "torch_threads": torch.get_num_threads(),
        "step_s": {k: round(v, 4) for k, v in seconds.items()},
        "tiers_over_topk_1024": round(seconds["topk_1024"] / seconds["tiers"], 2),
        "tiers_over_vllm_sort": round(seconds["vllm_sort"] / seconds["tiers"], 2),
        "rows_decided_by_k": decided,
        "kept_tokens_per_row": {"median": float(kept["tiers"].sum(1).median()), "max": int(kept["tiers"].sum(1).max())},
        "same_kept_as_vllm": all(torch.equal(kept[k], kept["vllm_sort"]) for k in kept),
        "sample_step_s": {k: round(v, 4) for k, v in sample_s.items()},
        "from_candidates_over_vllm_gumbel": round(sample_s["tiers_then_vllm_gumbel"] / sample_s["from_candidates"], 2),
        "no_top_p_over_vllm_gumbel": round(sample_s["no_top_p_vllm_gumbel"] / sample_s["no_top_p_top_k_or_tail"], 2),
    }


def measure() -> dict[str, Any]:
    """The bench's model and prompts (scripts/bench.py), the same dict `make bench` stores as `top_p`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from train.config import DataConfig
    from train.data import arithmetic_splits, conversation
    from train.engine import render_prompts
    from train.models import load_tokenizer, resolve_model

    model_path = resolve_model("smollm2-135m-instruct")
    data = DataConfig(instruction="Answer with just the number.")
    items = arithmetic_splits(data, seed=0)[0][:16]
    prompt_ids = render_prompts(load_tokenizer(model_path), [conversation(it, data) for it in items])
    return bench_top_p(model_path, prompt_ids) | {"method": __doc__.split("\n\n")[1].replace("\n", " ")}


def main() -> int:
    print(json.dumps(measure(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
