"""`make bench`: sampler throughput, LoRA hot-swap vs full reload, and pipeline overhead, in one run.

Writes runs/bench/<timestamp>.json and prints a table with PASS/MISS per goal (scripts/bench_report.py):
  vLLM generate >= 1.5x HF generate (tokens/s), adapter hot-swap >= 5x faster than merge + reload,
  the fixed per-process overhead <= 5% of a demo iteration, and the demo's generate phase (from --demo-dir) at
  >= 128 tokens/s and >= 30% of the measured matmul peak (roofline: scripts/roofline.py).
Also a roofline (scripts/roofline.py): peak matmul FLOP/s at the model's shapes, and the demo run's (--demo-dir)
per-phase FLOP/s against it; `--roofline-only` runs just that (seconds).
Run with the venv's python from the repo root: `.venv/bin/python scripts/bench.py` (vLLM spawns processes,
hence the __main__ guard). About 10 minutes on an idle 2-core CPU, 16-25 on a loaded one.
"""

from __future__ import annotations

import time

T_ENTER = time.time()  # the scpo child's first statement: interpreter start-up ends about here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench_report import method_texts, print_table, verdicts  # noqa: E402
from roofline import describe_machine, load_average  # noqa: E402

RECIPE = "recipes/scpo/smollm2-135m-cpu.yaml"
MODEL = "smollm2-135m-instruct"
NUM_PROMPTS, NUM_SAMPLES, MAX_TOKENS, TEMPERATURE = 16, 4, 64, 0.8
REPEATS = 1  # timed generate runs per engine after a warm-up (HF with 2 threads on a loaded 2-core box is slow)
KV_GIB = 1  # vLLM-CPU KV cache per engine in GiB, fixed as the CPU recipes set it (sampling.kv_cache_gib)


# ---- overhead: one small ScPO iteration in a child process -----------------------------------------------------


def scpo_child(result_json: str, argv: list[str]) -> int:
    """Runs inside the child: `selfreward run ...` as the console script does (`train.cli.entry`), then records
    where the time went."""
    t_main = time.time()
    from train import engine
    from train.cli import end_process, main

    rc = main(["run", *argv], exit_after=True)
    t_end = time.time()
    record = {"rc": rc, "t_enter": T_ENTER, "t_main": t_main, "t_end": t_end} | engine.engine_stats()
    Path(result_json).write_text(json.dumps(record))
    end_process(rc)  # as `selfreward` ends (train.cli.entry); does not return
    return rc


def bench_overhead(out_root: Path, stamp: str) -> dict[str, Any]:
    out = out_root / f"scpo-{stamp}"
    overrides = [
        f"output_dir={out}",
        "iterations=1",
        "max_prompts=8",
        "eval.enabled=false",
        "trainer.max_steps=2",
        f"sampling.kv_cache_gib={KV_GIB}",
    ]
    result_json = out_root / f"{stamp}-scpo-child.json"
    log_path = out_root / f"{stamp}-scpo.log"
    env = os.environ | {"PYTHONPATH": str(ROOT), "CI": "true"}  # no progress bars in the log
    cmd = [sys.executable, str(Path(__file__).resolve()), "--scpo-child", str(result_json), "--", RECIPE, *overrides]
    t_spawn = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t_spawn
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"scpo child exited {rc}; log {log_path}:\n{tail}")
    child = json.loads(result_json.read_text())
    phases = {p.stem: json.loads(p.read_text())["seconds"] for p in sorted((out / "iter_1" / "phases").glob("*.json"))}
    train_metrics = json.loads((out / "iter_1" / "phases" / "train.json").read_text())["metrics"]
    model_work = child["engine_start_s"] + child["engine_generate_s"] + phases["train"]
    phase_work = phases["generate"] + phases["train"]
    return {
        "command": " ".join(["selfreward run", RECIPE, *overrides]),
        "wall_s": round(wall, 2),
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "engine_start_s": round(child["engine_start_s"], 2),
        "engine_generate_s": round(child["engine_generate_s"], 2),
        "train_phase_s": round(phases["train"], 2),
        "train_runtime_s": train_metrics.get("train_runtime"),
        "startup_s": round(child["t_enter"] - t_spawn, 2),  # interpreter + this script's imports
        "cli_outside_phases_s": round(
            child["t_end"] - child["t_main"] - sum(phases.values()) - child.get("engine_close_s", 0.0), 2
        ),
        "engine_close_s": round(child.get("engine_close_s") or 0.0, 2),  # inside the run, after its last phase
        "teardown_s": round(t_spawn + wall - child["t_end"], 2),  # atexit, interpreter exit
        "generate_phase_outside_engine_s": round(
            phases["generate"] - child["engine_start_s"] - child["engine_generate_s"], 2
        ),
        "model_work_s": round(model_work, 2),
        "overhead_fraction": round((wall - model_work) / wall, 4),
        "overhead_fraction_phase_level": round((wall - phase_work) / wall, 4),
    }


# ---- throughput, hot-swap, full reload (this process) ----------------------------------------------------------


def _tokens(outs: list[list[Any]]) -> int:
    return sum(len(s.token_ids) for row in outs for s in row)


def _throughput(sampler: Any, prompt_ids: list[list[int]], params: Any, repeats: int) -> dict[str, Any]:
    """Best of `repeats` timed runs (the machine is shared: the fastest run is the least disturbed)."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        toks = _tokens(sampler.generate_ids(prompt_ids, params))
        seconds = time.perf_counter() - t0
        runs.append((toks / seconds, toks, seconds))
    best = max(runs)
    return {"tokens_per_s": round(best[0], 1), "tokens": best[1], "seconds": round(best[2], 2),
            "all_tokens_per_s": [round(r[0], 1) for r in runs]}  # fmt: skip


def _make_adapter(model: Any, path: Path, seed: int) -> Any:
    """A random (non-zero) LoRA on `model`, saved as safetensors; returns the unwrapped base model."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    for name, p in peft_model.named_parameters():  # keep the random update small: outputs stay sensible
        if "lora_B" in name:
            p.data.mul_(0.01)
    peft_model.save_pretrained(str(path), safe_serialization=True)
    return peft_model.unload()


def _log(msg: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {msg}", flush=True)


def bench_engines(tmp: Path, res: dict[str, Any]) -> None:
    """Fills `res` as it goes, so a failure late in the run keeps the figures measured before it."""
    import torch

    from train.config import DataConfig, SamplingConfig
    from train.data import arithmetic_splits, conversation
    from train.engine import GenParams, HFSampler, VLLMSampler, render_prompts
    from train.engine.vllm import engine_dtype
    from train.models import load_causal_lm, resolve_model

    model_path = resolve_model(MODEL)
    cfg = SamplingConfig(kv_cache_gib=KV_GIB, max_model_len=512, batch_size=64)
    data = DataConfig(instruction="Answer with just the number.")
    items = arithmetic_splits(data, seed=0)[0][:NUM_PROMPTS]
    res |= {"model": MODEL, "prompts": len(items), "samples_per_prompt": NUM_SAMPLES, "max_tokens": MAX_TOKENS,
            "temperature": TEMPERATURE, "dtype": engine_dtype(cfg.dtype, torch.cuda.is_available()),
            "hf_dtype": "float32"}  # fmt: skip
    params = GenParams(n=NUM_SAMPLES, temperature=TEMPERATURE, top_p=1.0, max_tokens=MAX_TOKENS)
    warm = GenParams(n=2, temperature=TEMPERATURE, max_tokens=8)

    vllm = VLLMSampler(model_path, cfg, lora_rank=16, seed=0)
    res["vllm_engine_start_s"] = round(vllm.engine_start_s, 2)
    res["lora_sync"] = vllm.lora_sync  # how the swap below reaches the engine (sampling.lora_sync, as the demo)
    prompt_ids = render_prompts(vllm.tokenizer, [conversation(it, data) for it in items])
    vllm.generate_ids(prompt_ids[:4], warm)
    res["vllm"] = _throughput(vllm, prompt_ids, params, REPEATS)
    res["vllm_tokens_per_s"] = res["vllm"]["tokens_per_s"]
    _log(f"vLLM {res['vllm_tokens_per_s']} tokens/s")

    # Hot-swap: adapter on disk -> set_adapter -> first generated token, three fresh adapters.
    maker = load_causal_lm(model_path)
    one = GenParams(n=1, temperature=0.0, max_tokens=1)
    swaps = []
    for i in range(3):
        path = tmp / f"adapter-{i}"
        maker = _make_adapter(maker, path, seed=i)
        t0 = time.perf_counter()
        vllm.set_adapter(str(path))
        out = vllm.generate_ids(prompt_ids[:1], one)
        swaps.append(time.perf_counter() - t0)
        assert _tokens(out) == 1
    res["adapter_swap_runs_s"] = [round(s, 3) for s in swaps]
    res["adapter_swap_s"] = round(statistics.median(swaps), 3)
    _log(f"adapter swap {res['adapter_swap_runs_s']} s")
    # With the adapter live (iterations >= 2 sample through a LoRA).
    res["vllm_lora_tokens_per_s"] = _throughput(vllm, prompt_ids, params, 1)["tokens_per_s"]
    _log(f"vLLM with LoRA {res['vllm_lora_tokens_per_s']} tokens/s")

    # Full reload (TRL's alternative, here through disk): merge the adapter held in memory into the weights, save
    # safetensors, start a fresh engine without LoRA, generate the first token.
    from peft import PeftModel
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    peft_model = PeftModel.from_pretrained(maker, str(tmp / "adapter-2"))
    merged_dir = tmp / "merged"
    t0 = time.perf_counter()
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
    vllm.tokenizer.save_pretrained(str(merged_dir))
    t_saved = time.perf_counter()
    llm = LLM(model=str(merged_dir), dtype="float32", max_model_len=512, kv_cache_memory_bytes=int(KV_GIB * 2**30),
              enable_prefix_caching=True, seed=0, use_tqdm_on_load=False)  # fmt: skip
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[0])], SamplingParams(max_tokens=1), use_tqdm=False)
    res["full_reload_s"] = round(time.perf_counter() - t0, 2)
    res["full_reload_merge_save_s"] = round(t_saved - t0, 2)
    assert len(out[0].outputs[0].token_ids) == 1
    res["reload_over_swap"] = round(res["full_reload_s"] / res["adapter_swap_s"], 1)
    _log(f"full reload {res['full_reload_s']} s")
    llm.llm_engine.engine_core.shutdown()  # free its memory before the HF runs
    del llm, merged, peft_model, maker

    # HF generate as the project configures it (torch's default threads), then with as many threads as the vLLM
    # engine gets.
    hf = HFSampler(model_path, cfg, seed=0)
    res["hf_load_s"] = round(hf.engine_start_s, 2)
    hf.generate_ids(prompt_ids[:4], warm)
    threads = torch.get_num_threads()
    res["hf"] = _throughput(hf, prompt_ids, params, REPEATS) | {"torch_threads": threads}
    res["hf_tokens_per_s"] = res["hf"]["tokens_per_s"]
    res["vllm_speedup"] = round(res["vllm_tokens_per_s"] / res["hf_tokens_per_s"], 2)
    _log(f"HF {res['hf_tokens_per_s']} tokens/s ({threads} threads)")
    # The CPU engine runs in this process (train.engine.vllm.cpu_engine_settings) on torch's threads; a multiprocess
    # engine (VLLM_ENABLE_V1_MULTIPROCESSING=1) binds its worker to cpu_count - 1 cores.
    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    reserved = int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1"))
    vllm_threads = threads if in_process else max(1, (os.cpu_count() or 1) - reserved)
    res["vllm_worker_threads"] = vllm_threads
    if vllm_threads != threads:
        torch.set_num_threads(vllm_threads)
        res["hf_matched_threads"] = _throughput(hf, prompt_ids, params, REPEATS) | {"torch_threads": vllm_threads}
        res["vllm_speedup_matched_threads"] = round(
            res["vllm_tokens_per_s"] / res["hf_matched_threads"]["tokens_per_s"], 2
        )
        _log(f"HF {res['hf_matched_threads']['tokens_per_s']} tokens/s ({vllm_threads} threads)")
    hf.set_adapter(str(tmp / "adapter-2"))  # PEFT, unmerged: what HFSampler does
    res["hf_lora_tokens_per_s"] = _throughput(hf, prompt_ids, params, REPEATS)["tokens_per_s"]
    res["hf_lora_torch_threads"] = torch.get_num_threads()
    torch.set_num_threads(threads)
    _log(f"HF with LoRA {res['hf_lora_tokens_per_s']} tokens/s ({res['hf_lora_torch_threads']} threads)")


# ---- the CPU LoRA fast path against vLLM's own ops (a child process: the plugin loads at engine start) --------


def lora_child(result_json: str) -> int:
    """Inside a child (sampling.lora_sync: adapter; SELFREWARD_CPU_LORA_FASTPATH set by the parent): tokens/s with
    an adapter live through vLLM's LoRA."""
    from train.config import DataConfig, SamplingConfig
    from train.data import arithmetic_splits, conversation
    from train.engine import GenParams, VLLMSampler, render_prompts
    from train.models import load_causal_lm, resolve_model

    model_path = resolve_model(MODEL)
    data = DataConfig(instruction="Answer with just the number.")
    items = arithmetic_splits(data, seed=0)[0][:NUM_PROMPTS]
    cfg = SamplingConfig(kv_cache_gib=KV_GIB, max_model_len=512, batch_size=64, lora_sync="adapter")
    vllm = VLLMSampler(model_path, cfg, 16, seed=0)
    prompt_ids = render_prompts(vllm.tokenizer, [conversation(it, data) for it in items])
    with tempfile.TemporaryDirectory(prefix="selfreward-bench-") as tmp:
        _make_adapter(load_causal_lm(model_path), Path(tmp) / "a", seed=0)
        vllm.set_adapter(str(Path(tmp) / "a"))
        vllm.generate_ids(prompt_ids[:4], GenParams(n=2, temperature=TEMPERATURE, max_tokens=8))
        params = GenParams(n=NUM_SAMPLES, temperature=TEMPERATURE, top_p=1.0, max_tokens=MAX_TOKENS)
        Path(result_json).write_text(json.dumps(_throughput(vllm, prompt_ids, params, 1)))
    vllm.close()
    return 0


def bench_lora_adapter(out_root: Path, stamp: str, fastpath: bool) -> float:
    result_json = out_root / f"{stamp}-lora-child-{'fastpath' if fastpath else 'vllm-ops'}.json"
    env = os.environ | {"PYTHONPATH": str(ROOT), "SELFREWARD_CPU_LORA_FASTPATH": "1" if fastpath else "0"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--lora-child", str(result_json)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"lora child exited {res.returncode}: {res.stderr[-2000:]}")
    return json.loads(result_json.read_text())["tokens_per_s"]


def bench_rest(out_root: Path, stamp: str, results: dict[str, Any]) -> None:
    """Throughput, hot-swap and full reload in this process, then the LoRA-as-adapter children."""
    try:
        with tempfile.TemporaryDirectory(prefix="selfreward-bench-") as tmp:
            bench_engines(Path(tmp), results)
    except Exception as e:
        results["errors"]["engines"] = f"{type(e).__name__}: {e}"
    try:  # vLLM's LoRA (sampling.lora_sync: adapter), with our CPU LoRA ops and with vLLM's own
        results["vllm_adapter_tokens_per_s"] = bench_lora_adapter(out_root, stamp, fastpath=True)
        _log(f"vLLM with LoRA as an adapter: {results['vllm_adapter_tokens_per_s']} tokens/s")
        results["vllm_lora_tokens_per_s_vllm_ops"] = bench_lora_adapter(out_root, stamp, fastpath=False)
        results["cpu_lora_fastpath_speedup"] = round(
            results["vllm_adapter_tokens_per_s"] / results["vllm_lora_tokens_per_s_vllm_ops"], 2
        )
        _log(f"vLLM with LoRA, vLLM's own CPU ops: {results['vllm_lora_tokens_per_s_vllm_ops']} tokens/s")
        if results.get("vllm_lora_tokens_per_s") and results.get("lora_sync") == "merge":
            results["merge_over_adapter"] = round(
                results["vllm_lora_tokens_per_s"] / results["vllm_adapter_tokens_per_s"], 2
            )
    except Exception as e:
        results["errors"]["lora_adapter"] = f"{type(e).__name__}: {e}"
    try:  # CPU top-p per decode step: vLLM's sort, one topk(1024), the tiers (scripts/bench_top_p.py)
        from bench_top_p import measure

        results["top_p"] = measure()
        _log(f"top-p step s: {results['top_p']['step_s']}")
    except Exception as e:
        results["errors"]["top_p"] = f"{type(e).__name__}: {e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--skip-overhead", action="store_true", help="skip the ScPO iteration (about 3-5 minutes)")
    ap.add_argument("--demo-dir", help="a demo run's output_dir for the roofline (default: runs/demo if it exists)")
    ap.add_argument("--roofline-only", action="store_true", help="only the matmul peaks and the demo-dir analysis")
    ap.add_argument("--scpo-child", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("--lora-child", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("child_argv", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scpo_child:
        return scpo_child(args.scpo_child[0], args.child_argv)
    if args.lora_child:
        return lora_child(args.lora_child[0])

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_GIB))  # inherited by the scpo child

    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "errors": {},
    }
    t0 = time.time()
    demo_dir = Path(args.demo_dir) if args.demo_dir else ROOT / "runs" / "demo"
    demo_dir = demo_dir if args.demo_dir or demo_dir.is_dir() else None
    if not (args.skip_overhead or args.roofline_only):
        try:
            results["overhead"] = bench_overhead(out_root, stamp)
            results["overhead_fraction"] = results["overhead"]["overhead_fraction"]
            _log(f"scpo iteration: wall {results['overhead']['wall_s']} s, overhead {results['overhead_fraction']}")
        except Exception as e:  # keep measuring the rest; the error is in the JSON and the exit status
            results["errors"]["overhead"] = f"{type(e).__name__}: {e}"
    try:  # seconds: matmul peaks at the model's shapes, then the demo run's phases against them
        from roofline import bench_roofline

        ov = results.get("overhead")
        results |= bench_roofline(demo_dir, MODEL, ov["wall_s"] - ov["model_work_s"] if ov else None)
        _log(f"roofline: peak matmul FLOP/s {results['peak_matmul_flops']}")
    except Exception as e:
        results["errors"]["roofline"] = f"{type(e).__name__}: {e}"
    if not args.roofline_only:
        bench_rest(out_root, stamp, results)
    results["machine"]["load_average_end"] = load_average()
    results["bench_wall_s"] = round(time.time() - t0, 1)
    if not args.roofline_only:
        results["goals"] = verdicts(results)
    results["method"] = method_texts(NUM_PROMPTS, NUM_SAMPLES, MAX_TOKENS, TEMPERATURE, REPEATS)
    path = out_root / f"{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    print_table(results, args.roofline_only)
    for name, err in results["errors"].items():
        print(f"error in {name}: {err}", file=sys.stderr)
    print(f"\nwrote {path}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
