"""A roofline for `make bench`: the machine's peak matmul FLOP/s at the model's shapes, the model's FLOPs per token,
and what fraction of that peak each phase of a real run (the demo) achieved.

Plain functions; `scripts/bench.py` calls `roofline_results` and merges its keys into the bench JSON.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHASES = ("generate", "train", "eval")
# Training FLOPs per token as a multiple of the forward's, LoRA-DPO (see `model_flops_per_token`).


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def describe_machine() -> dict[str, Any]:
    """The machine the peaks are measured on. They and the fractions depend on the ISA more than on anything else:
    the AMX bf16 peak measured 15-18x an AVX2-only box's float32 peak, while the non-matmul costs did not shrink with
    it (docs/results.md, session 13)."""
    import torch

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "load_average_start": load_average(),
    }


def model_flops_per_token(config: dict[str, Any], context_len: int, reference_passes: float = 1.0) -> dict[str, Any]:
    """FLOPs per token of a LlamaForCausalLM (a HF config.json dict), forward and LoRA-DPO training.

    Matmul parameters, per layer: q (h·H·d) + k, v (h·KV·d each) + o (H·d·h) + gate, up (h·i each) + down (i·h),
    with h = hidden_size, i = intermediate_size, H / KV = attention / key-value heads, d = head_dim (default h/H);
    N = layers · that + h·V for the LM head (V = vocab_size), counted even when tied to the embedding: the tie
    shares the weights, not the matmul. The embedding lookup and the norms do no matmul.

    forward FLOPs/token = 2·N (a multiply and an add per weight) + 2·2·layers·context_len·H·d (QKᵀ and AV: each
    query attends to `context_len` keys; H·d = hidden for Llama).

    train FLOPs/token = (2 + reference_passes) × forward, for LoRA-DPO: policy forward 1×; backward 1×, because the frozen weights
    need only the activation gradients (dX = dY·Wᵀ, one matmul per weight: 2·N), not weight gradients (dW = Xᵀ·dY,
    the other 2·N of a full backward, skipped for frozen weights); reference forward `reference_passes`× per trained
    token: 1 with a reference forward every step (TRL's default), 1/epochs with `precompute_ref_log_probs` (this
    project's DPO default: once per iteration, while TRL's num_tokens counts every epoch). Neglected: the LoRA
    matrices' 6·r·(in + out) FLOPs per adapted matrix per token (policy forward, activation and weight gradients;
    about 4% of the 6·N for SmolLM2-135M at r = 16 on all linear layers), and attention's backward being 2× its
    forward (dQ, dK and dV are all needed), one more attention forward (under 2% here). Gradient checkpointing (off
    in this project's defaults) would add one more policy forward (4×).

    Returns the total parameter count (embedding once if tied, norms included), N, and the FLOPs per token.
    """
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    vocab, tied = config["vocab_size"], bool(config.get("tie_word_embeddings", False))
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i
    matmul_params = layers * per_layer + h * vocab
    norms = layers * 2 * h + h
    parameters = layers * per_layer + norms + vocab * h * (1 if tied else 2)
    attention = 2 * 2 * layers * context_len * heads * d
    forward = 2 * matmul_params + attention
    return {
        "parameters": parameters,
        "matmul_parameters": matmul_params,
        "context_len": context_len,
        "attention_flops_per_token": attention,
        "forward": forward,
        "train_multiplier": 2 + reference_passes,
        "train": (2 + reference_passes) * forward,
    }


def model_matmul_shapes(config: dict[str, Any], tokens: tuple[int, ...] = (256, 512)) -> list[tuple[int, int, int]]:
    """(m, k, n) for [m, k] × [k, n] at the model's shapes: [tokens, h]×[h, i] (gate/up), [tokens, i]×[i, h] (down),
    [tokens, h]×[h, h] (q/o); [min(tokens), h]×[h, vocab] (LM head, once: at 512 tokens it is ~1 s per call on 2
    CPU cores)."""
    h, i, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = [s for t in tokens for s in ((t, h, i), (t, i, h), (t, h, h))]
    return shapes + [(min(tokens), h, vocab)]


def peak_matmul_flops(
    dtype: str, shapes: list[tuple[int, int, int]], seconds: float = 0.4, device: str = "cpu", min_runs: int = 2
) -> dict[str, Any]:
    """Best-of timing of `torch.matmul` per (m, k, n) shape, with torch's default threads: one warm-up call, then
    calls until `seconds` have passed (at least `min_runs`); FLOP/s = 2·m·k·n / fastest call. The peak is the
    largest over the shapes. bfloat16 only where it runs natively (`train.models.bf16_supported`: AVX-512 BF16 or
    AMX on a CPU); else `supported` is false and the peak None."""
    import torch

    from train.models import bf16_supported

    out: dict[str, Any] = {"dtype": dtype, "device": device, "torch_threads": torch.get_num_threads()}
    if dtype == "bfloat16" and not bf16_supported(device):
        return out | {"supported": False, "peak_flops_per_s": None, "shapes": []}
    tdtype = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=tdtype, device=device)
        b = torch.randn(k, n, dtype=tdtype, device=device)
        torch.matmul(a, b)
        sync()
        best, runs, start = float("inf"), 0, time.perf_counter()
        while runs < min_runs or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync()
            best = min(best, time.perf_counter() - t0)
            runs += 1
        rows.append({"m": m, "k": k, "n": n, "runs": runs, "best_s": best, "flops_per_s": 2 * m * k * n / best})
    return out | {
        "supported": True,
        "shapes": rows,
        "peak_flops_per_s": max(r["flops_per_s"] for r in rows) if rows else None,
    }


def _phase_records(run_dir: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """{iteration: {phase: {"seconds", "metrics"}}} from `iter_*/phases/<phase>.json`, completed from
    metrics.jsonl rows (`time/<phase>_s`, `<phase>/<key>`) for phases whose file is absent."""
    records: dict[int, dict[str, dict[str, Any]]] = {}
    for path in sorted(run_dir.glob("iter_*/phases/*.json")):
        match = re.fullmatch(r"iter_(\d+)", path.parent.parent.name)
        if match:
            rec = json.loads(path.read_text())
            records.setdefault(int(match[1]), {})[path.stem] = {"seconds": rec["seconds"], "metrics": rec["metrics"]}
    metrics_path = run_dir / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    for row in rows:
        have = records.setdefault(int(row["iteration"]), {})
        for key, seconds in row.items():
            phase = key[len("time/") : -len("_s")] if key.startswith("time/") and key.endswith("_s") else None
            if phase and phase not in have:
                metrics = {k[len(phase) + 1 :]: v for k, v in row.items() if k.startswith(f"{phase}/")}
                have[phase] = {"seconds": seconds, "metrics": metrics}
    return records


def _phase_tokens(phase: str, metrics: dict[str, Any], eval_samples: int | None) -> tuple[float | None, str]:
    """Tokens a phase pushed through the model, and where the figure comes from. Generate and eval count each prompt
    once (`prompt_tokens`, recorded since issue 15) plus the completion tokens: recomputing a prompt for each of its n
    samples (when prefix caching cannot share it) is not counted as useful work."""
    prompts = metrics.get("prompt_tokens") or 0

    def plus(tokens: float, source: str) -> tuple[float, str]:
        return (tokens + prompts, f"{source} + prompt_tokens (each prompt once)") if prompts else (tokens, source)

    if phase == "generate" and "samples" in metrics and "mean_tokens" in metrics:
        return plus(metrics["samples"] * metrics["mean_tokens"], "samples × mean_tokens (completion tokens)")
    if phase == "train" and "num_tokens" in metrics:
        return metrics["num_tokens"], "num_tokens (TRL: non-padding prompt + completion tokens, chosen and rejected)"
    if phase == "eval" and "tokens" in metrics:
        return plus(metrics["tokens"], "tokens (completion tokens, greedy + sampled)")
    if phase == "eval" and eval_samples is not None and "n" in metrics and "greedy_length" in metrics:
        return (
            metrics["n"] * metrics["greedy_length"] * (1 + eval_samples),
            "estimate: n × greedy_length × (1 + eval.num_samples) (run made before eval recorded `tokens`)",
        )
    return None, "no token count in the metrics"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def phase_roofline(run_dir: Path, flops_per_token: dict[str, Any], peak: float | None) -> dict[str, Any]:
    """Achieved FLOP/s per phase of a run and its fraction of `peak`, from the run's own phase records.

    For generate / train / eval, summed over the iterations that have the phase: tokens (see `_phase_tokens`; generate
    and eval: completion tokens plus each prompt once where the run recorded `prompt_tokens`), FLOPs =
    tokens × FLOPs/token (`forward` for generate and eval, `train` for train), achieved FLOP/s = FLOPs / phase seconds
    (wall time of the phase: engine start/wake, adapter swap, model load and saving included), fraction = achieved /
    peak. Train also gets `flops_per_s_train_runtime` over TRL's `train_runtime` (the step loop only).
    `generate_tokens_per_s` = generate completion tokens (`completion_tokens`) / generate seconds. `iteration_wall_s` is the sum of the
    phase seconds of the last iteration that has both a generate and a train phase (a whole demo iteration).
    Missing phases or token counts give None and a note in `missing`; nothing raises.
    """
    run_dir = Path(run_dir)
    records = _phase_records(run_dir)
    recipe_path = run_dir / "recipe.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.exists() else {}
    eval_samples = (recipe.get("eval") or {}).get("num_samples")
    out: dict[str, Any] = {"run_dir": str(run_dir), "iterations": sorted(records), "phases": {}, "missing": []}
    for phase in PHASES:
        rows = []
        for k in sorted(records):
            rec = records[k].get(phase)
            if rec is None:
                continue
            tokens, source = _phase_tokens(phase, rec["metrics"], eval_samples)
            m = rec["metrics"]
            rows.append({"iteration": k, "seconds": rec["seconds"], "tokens": tokens, "tokens_source": source,
                         "train_runtime": m.get("train_runtime"),
                         "completion": m["samples"] * m["mean_tokens"] if "mean_tokens" in m else None})  # fmt: skip
        if not rows:
            out["missing"].append(f"{phase}: no phase record")
            out["phases"][phase] = None
            continue
        counted = [r for r in rows if r["tokens"] is not None]
        if len(counted) < len(rows):
            without = [r["iteration"] for r in rows if r["tokens"] is None]
            out["missing"].append(f"{phase}: no token count in iteration(s) {without}")
        seconds = sum(r["seconds"] for r in counted)
        tokens = sum(r["tokens"] for r in counted)
        flops = tokens * flops_per_token["train" if phase == "train" else "forward"] if counted else None
        achieved = _ratio(flops, seconds)
        entry = {
            "iterations": [r["iteration"] for r in counted],
            "seconds": seconds,
            "tokens": tokens if counted else None,
            "tokens_source": sorted({r["tokens_source"] for r in counted}),
            "flops": flops,
            "flops_per_s": achieved,
            "peak_fraction": _ratio(achieved, peak),
            "per_iteration": [{k: r[k] for k in ("iteration", "seconds", "tokens")} for r in rows],
        }
        if phase == "generate":  # completion tokens only, comparable with the synthetic `vllm_tokens_per_s`
            entry["completion_tokens"] = sum(r["completion"] or 0 for r in counted)
        if phase == "train":
            runtime = [r["train_runtime"] for r in counted if r["train_runtime"] is not None]
            entry["flops_per_s_train_runtime"] = _ratio(flops, sum(runtime)) if len(runtime) == len(counted) else None
        out["phases"][phase] = entry
    gen = out["phases"]["generate"]
    out["generate_tokens_per_s"] = _ratio(gen["completion_tokens"], gen["seconds"]) if gen else None
    full = [k for k in sorted(records) if "generate" in records[k] and "train" in records[k]]
    out["iteration"] = full[-1] if full else None
    out["iteration_wall_s"] = sum(r["seconds"] for r in records[full[-1]].values()) if full else None
    if not full:
        out["missing"].append("no iteration with both a generate and a train phase: no iteration wall time")
    return out


def _sig(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def roofline_results(
    config: dict[str, Any],
    demo_dir: Path | None,
    overhead_s: float | None,
    *,
    dtype: str = "float32",
    context_len: int = 64,
    reference_passes: float = 1.0,
    seconds: float = 0.4,
    device: str = "cpu",
) -> dict[str, Any]:
    """The bench JSON's roofline keys: peaks per dtype, FLOPs/token, and (with a demo dir) per-phase fractions of
    the `dtype` peak, the demo's generate tokens/s and `overhead_demo_fraction` = overhead_s / iteration_wall_s."""
    shapes = model_matmul_shapes(config)
    dtypes = dict.fromkeys(("float32", "bfloat16", dtype))
    peaks = {dt: peak_matmul_flops(dt, shapes, seconds=seconds, device=device) for dt in dtypes}
    fpt = model_flops_per_token(config, context_len, reference_passes)
    res: dict[str, Any] = {
        "peak_matmul_flops": {dt: _sig(p["peak_flops_per_s"]) for dt, p in peaks.items()},
        "peak_matmul": peaks,
        "model_flops_per_token": fpt,
        "roofline_dtype": dtype,
    }
    keys = ("generate_tokens_per_s_demo", "overhead_demo_fraction")
    keys += tuple(f"{p}_peak_fraction" for p in PHASES)
    res |= dict.fromkeys(keys)
    if demo_dir is None or not Path(demo_dir).is_dir():
        res["roofline"] = {"skipped": f"no demo run dir ({demo_dir}): run `make demo` first or pass --demo-dir"}
        return res
    roof = phase_roofline(Path(demo_dir), fpt, peaks[dtype]["peak_flops_per_s"])
    res["roofline"] = roof
    for p in PHASES:
        res[f"{p}_peak_fraction"] = _sig((roof["phases"][p] or {}).get("peak_fraction"))
    res["generate_tokens_per_s_demo"] = _sig(roof["generate_tokens_per_s"])
    if overhead_s is None:
        roof["missing"].append("overhead_demo_fraction: the per-process overhead was not measured in this run")
    else:
        res["overhead_demo_fraction"] = _sig(_ratio(overhead_s, roof["iteration_wall_s"]))
    return res


def bench_roofline(demo_dir: Path | None, default_model: str, overhead_s: float | None) -> dict[str, Any]:
    """`roofline_results` for the demo's model (its recipe.json, else `default_model`) against the peak of the dtype
    its engine sampled in (`sampling.dtype`, `auto` resolved as the engine does: bf16 on CPUs with native bf16, where
    the DPO trainer also runs under bf16 autocast), on the GPU when there is one."""
    import torch

    from train.engine.vllm import engine_dtype
    from train.models import resolve_dtype, resolve_model

    recipe_path = Path(demo_dir) / "recipe.json" if demo_dir else None
    recipe = json.loads(recipe_path.read_text()) if recipe_path and recipe_path.is_file() else {}
    model = recipe.get("model") or default_model
    config = json.loads((Path(resolve_model(model)) / "config.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampled = engine_dtype((recipe.get("sampling") or {}).get("dtype", "auto"), device == "cuda")
    dtype = resolve_dtype(recipe.get("model_dtype", "auto"), device) if sampled == "auto" else sampled
    trainer = recipe.get("trainer") or {}
    epochs = float(trainer.get("num_train_epochs", 3))  # TRL's default
    ref = 1 / epochs if trainer.get("precompute_ref_log_probs", True) and epochs > 0 else 1.0
    return {"roofline_model": model} | roofline_results(
        config, demo_dir, overhead_s, dtype=dtype, device=device, reference_passes=ref
    )


METHOD = {
    "peak_matmul_flops": "FLOP/s of torch.matmul at the model's shapes (roofline.model_matmul_shapes: [256|512, h]x"
    "[h, i], [.., i]x[i, h], [.., h]x[h, h], [256, h]x[h, vocab]), torch's default threads, per dtype: one warm-up "
    "call, then repeated calls for 0.4 s (at least 2), fastest call kept; 2*m*k*n / seconds; the peak is the max over "
    "shapes (details in `peak_matmul`). bfloat16 only where the CPU has AVX-512 BF16 or AMX (else null).",
    "model_flops_per_token": "N = matmul parameters (q, k, v, o, gate, up, down per layer + the LM head h*vocab, "
    "counted even when tied). forward = 2*N + 2*2*layers*context_len*heads*head_dim (QK^T and AV; context_len = "
    "64, about a demo prompt plus half an answer: attention is under 2% of the forward here). train = (2 + "
    "reference_passes) x forward (LoRA-DPO: policy forward, backward through frozen weights = activation gradients "
    "only, and the reference forward: 1/num_train_epochs per trained token with the precomputed reference, this "
    "project's DPO default; LoRA FLOPs, ~4%, neglected).",
    "roofline": "from the demo run dir (--demo-dir): iter_*/phases/<phase>.json, completed from metrics.jsonl. Per "
    "phase, summed over iterations: tokens (generate: samples x mean_tokens; train: TRL num_tokens; eval: its "
    "`tokens` metric, else n x greedy_length x (1 + eval.num_samples)); generate and eval add each prompt once "
    "(`prompt_tokens`, where the run recorded it; a prompt recomputed for each of its samples is not counted). FLOPs = tokens x FLOPs/token (train: "
    "the train figure), achieved FLOP/s = FLOPs / phase wall seconds (engine start/wake, adapter swap, model "
    "load and save included), *_peak_fraction = achieved / peak_matmul_flops[roofline_dtype] (the dtype the demo "
    "sampled in: bf16 on CPUs with native bf16, where DPO also runs under bf16 autocast). On several ranks the token counts are totals and the fraction is of one device's peak.",
    "generate_tokens_per_s_demo": "the demo's generate phases: completion tokens (samples x mean_tokens) / phase "
    "seconds, summed over iterations; the real workload (short answers, n = scpo.num_samples), beside the "
    "synthetic vllm_tokens_per_s. Phase seconds include the engine wake and adapter swap.",
    "overhead_demo_fraction": "the fixed per-process overhead measured by `overhead` (wall_s - model_work_s) / the "
    "wall time of one demo iteration (sum of the phase seconds of the demo's last iteration with generate and "
    "train phases, eval included). Null without the overhead measurement (--roofline-only, --skip-overhead).",
}
