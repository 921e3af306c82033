"""`make bench`'s report: the goals and their verdicts, the JSON's method texts, the printed table."""

from __future__ import annotations

from typing import Any

from roofline import METHOD as ROOFLINE_METHOD

GOALS = {  # name: (value key, comparison, threshold, unit)
    "vllm_vs_hf": ("vllm_speedup", ">=", 1.5, "x"),
    "swap_vs_reload": ("reload_over_swap", ">=", 5.0, "x"),
    # The fixed per-process overhead against a demo-sized iteration (issue 15); `overhead_fraction`, against the
    # bench's toy iteration, stays in the JSON and the table.
    "overhead": ("overhead_demo_fraction", "<=", 0.05, ""),
    "demo_generate_rate": ("generate_tokens_per_s_demo", ">=", 128.0, "tokens/s"),  # 2x the 64 of issue 15
    "generate_vs_peak": ("generate_peak_fraction", ">=", 0.30, ""),
}


def method_texts(num_prompts: int, num_samples: int, max_tokens: int, temperature: float, repeats: int) -> dict:
    """How each figure is measured (the JSON's `method`)."""
    return {
        "throughput": f"{num_prompts} arithmetic prompts x {num_samples} samples, max_tokens {max_tokens}, "
        f"T={temperature}, vLLM in `dtype` (sampling.dtype auto: bf16 on CPUs with native bf16), HF in float32 (its CPU default), the same token ids to both train.engine engines (VLLMSampler with LoRA enabled, "
        "no adapter; HFSampler batch 64, torch's default threads); tokens = sum of len(Sample.token_ids); one warm-up "
        f"call, then {repeats} timed run(s) per engine (best kept). hf_matched_threads: HFSampler with torch threads "
        "set to the vLLM worker's OMP threads. *_lora_tokens_per_s: with a random r=16 all-linear adapter live (HF: "
        "PEFT unmerged, with the matched thread count); vLLM samples it as `lora_sync` says (the demo's setting: "
        "merged into the weights on CPU). vllm_adapter_tokens_per_s: the same adapter through vLLM's LoRA "
        "(sampling.lora_sync: adapter) in a child process, with train/engine/vllm_cpu_lora.py; "
        "vllm_lora_tokens_per_s_vllm_ops: the same child with SELFREWARD_CPU_LORA_FASTPATH=0 (vLLM's own CPU LoRA "
        "ops); cpu_lora_fastpath_speedup = their ratio; merge_over_adapter = vllm_lora_tokens_per_s / "
        "vllm_adapter_tokens_per_s (one run of each, different processes). "
        "vLLM KV cache: VLLM_CPU_KVCACHE_SPACE GiB per engine.",
        "adapter_swap_s": "median of 3: a fresh random r=16 all-linear PEFT adapter saved as safetensors, then "
        "VLLMSampler.set_adapter(path) + a 1-token greedy generate (`lora_sync` adapter: vLLM loads the adapter on "
        "that request; merge: the adapter is merged into the engine's weights in place before it)",
        "full_reload_s": "once: from the adapter loaded in a PeftModel in memory, merge_and_unload, save_pretrained "
        "(safetensors) + tokenizer, new vllm.LLM on the merged dir (no LoRA), 1-token generate. Without LoRA vLLM-CPU "
        "torch.compiles the model, so a first run includes the compile and later runs load it from vLLM's cache.",
        "overhead_fraction": "one ScPO iteration as a child process (`command`). wall = spawn to exit. model work = "
        "vLLM engine start (VLLMSampler construction, incl. import vllm) + seconds inside llm.generate + the train "
        "phase (TRL import, model load, DPO steps, adapter save). overhead = (wall - model work) / wall. "
        "overhead_fraction_phase_level uses generate phase + train phase as model work instead.",
    } | ROOFLINE_METHOD


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, (key, op, threshold, _) in GOALS.items():
        value = results.get(key)
        ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        out[name] = {"value": value, "goal": f"{op} {threshold}", "status": "PASS" if ok else "MISS"}
    return out


def print_table(results: dict[str, Any], roofline_only: bool = False) -> None:
    rows = [] if roofline_only else [(k, results.get(k)) for k in ("vllm_tokens_per_s", "hf_tokens_per_s", "vllm_speedup_matched_threads",
            "vllm_lora_tokens_per_s", "vllm_adapter_tokens_per_s", "merge_over_adapter", "vllm_lora_tokens_per_s_vllm_ops", "cpu_lora_fastpath_speedup", "hf_lora_tokens_per_s", "vllm_engine_start_s", "adapter_swap_s", "full_reload_s",
            "full_reload_merge_save_s")]  # fmt: skip
    ov = results.get("overhead") or {}
    rows += [
        (f"scpo {k}", ov.get(k))
        for k in ("wall_s", "model_work_s", "cli_outside_phases_s", "engine_close_s", "teardown_s")
        if not roofline_only
    ]
    top_p = (results.get("top_p") or {}).get("step_s") or {}  # scripts/bench_top_p.py
    rows += [(f"top-p step s, {k}", v) for k, v in top_p.items()]
    peaks = results.get("peak_matmul_flops") or {}
    rows += [(f"peak matmul {dt} GFLOP/s", v and round(v / 1e9, 1)) for dt, v in peaks.items()]
    rows += [(k, results.get(k)) for k in (*(f"{p}_peak_fraction" for p in ("generate", "train", "eval")),
             "generate_tokens_per_s_demo", "overhead_demo_fraction")]  # fmt: skip
    print(f"\n{'metric':<34}{'value':>12}")
    print("-" * 46)
    for k, v in rows:
        print(f"{k:<34}{'-' if v is None else v:>12}")
    if roofline_only:
        return
    print(f"\n{'goal':<20}{'value':>12}{'goal':>12}{'':>8}")
    print("-" * 52)
    for name, v in results["goals"].items():
        print(f"{name:<20}{'-' if v['value'] is None else v['value']:>12}{v['goal']:>12}{v['status']:>8}")
