#!/usr/bin/env python3
"""GPU smoke test: the training stages of the GPU recipes, at their shapes, with random weights, timed.

    python scripts/gpu_smoke.py --out DIR                  # GPU: Llama-3-8B / Qwen2.5-1.5B shapes, ~5-8 min
    python scripts/gpu_smoke.py --tiny --out DIR           # CPU dry run (the test suite): tiny shapes, ~1-2 min

Meant for a bare GPU machine with torch, transformers, peft and accelerate but no network: what else
train/trainers/weighted_dpo.py, train/trainers/score_grpo.py and DeepSpeed import is first installed from a wheelhouse
(scripts/build_wheelhouse.sh) into WORK/site-packages, never into the interpreter's environment. No weights travel: each model is built from its published
config with random init on the device, saved once under WORK and loaded by the project's own code; the tokenizer is
built in-script (word-level, one token per word, vocabulary = the model's), so sequence lengths are exact.

Stages (sampling.engine=hf semantics, no vLLM): dpo_iter1 (weighted_dpo.train_dpo, fresh LoRA, weighted ScPO loss),
dpo_iter2 (init_adapter = iteration 1's adapter), score_stage1 (SCoRe Stage I: score_grpo.train_stage, an HFSampler),
zero3 (dpo_iter1 again under `accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 1`).
DIR/gpu_smoke.json gets one entry per stage, rewritten after each stage so a killed run keeps what finished.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, also from the zero3 subprocess
from gpu_smoke_env import VERSIONS, install_missing, version  # noqa: E402
from gpu_smoke_models import SHAPES, build_model_dir, words  # noqa: E402

STAGES = ("dpo_iter1", "dpo_iter2", "score_stage1", "zero3")
# ---- measurement ---------------------------------------------------------------------------------------------------


def step_timer() -> Any:
    """A TrainerCallback timing each optimizer step (synchronised) and reading the trained model's dtypes."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.info: dict[str, Any] = {}
            self._t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.steps.append(time.perf_counter() - self._t0)
            if model is not None and not self.info:  # after the first step: as prepared (DeepSpeed casts)
                params = list(model.named_parameters())
                base = [p for n, p in params if "base_layer" in n] or [p for n, p in params if "lora_" not in n]
                lora = {str(p.dtype).removeprefix("torch.") for n, p in params if "lora_" in n and p.requires_grad}
                self.info = {
                    "base_dtype": str(base[0].dtype).removeprefix("torch.") if base else None,
                    "lora_dtype": ",".join(sorted(lora)) or None,
                    "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for _, p in params if p.requires_grad),
                    "zero3_partitioned": any(hasattr(p, "ds_id") for _, p in params),
                }

    return StepTimer()


def run_stage(fn: Callable[[dict[str, Any]], dict[str, float]]) -> dict[str, Any]:
    """Run one stage with a step timer; status, timings, dtypes, peak memory and memory left once it is freed.
    `fn(info)` returns the trainer's metrics and may note what it passed in `info`."""
    import torch
    import transformers.trainer as hf_trainer

    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = step_timer()
    hf_trainer.DEFAULT_CALLBACKS.append(timer)  # every Trainer built meanwhile (TRL's included) gets it
    rec: dict[str, Any] = {"status": "ok"}
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        metrics = fn(info)
    except Exception as e:  # one stage's failure is a result, not the end of the smoke test
        traceback.print_exc()
        lines = [s for s in traceback.format_exception_only(type(e), e) if s.strip()]
        rec, metrics = {"status": "failed", "error": lines[-1].strip()[:500]}, {}
    finally:
        hf_trainer.DEFAULT_CALLBACKS.remove(timer)
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    steps = timer.steps
    if steps:  # steady state: the first step pays for kernels, allocator growth and DeepSpeed's first gather
        rec |= {"steps": len(steps), "first_step_s": round(steps[0], 3),
                "seconds_per_step": round(sum(steps[1:]) / (len(steps) - 1) if len(steps) > 1 else steps[0], 3)}  # fmt: skip
    elif metrics.get("steps"):  # no callback hook (another transformers): TRL's runtime over its steps
        rec |= {"steps": int(metrics["steps"]), "seconds_per_step": metrics["train_runtime"] / metrics["steps"]}
    rec |= info | timer.info
    rec["metrics"] = {k: round(v, 5) for k, v in metrics.items() if k in ("train_loss", "loss", "steps")}
    peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else None
    gc.collect()  # the trainer went out of scope when fn returned; what stays allocated now is a leak
    if cuda:
        torch.cuda.empty_cache()
    after = torch.cuda.memory_allocated() if cuda else None
    for key, v in (("peak_allocated_gib", peak and peak[0]), ("peak_reserved_gib", peak and peak[1]),
                   ("allocated_after_free_gib", after)):  # fmt: skip
        rec[key] = None if v is None else round(v / 2**30, 3)
    return rec


# ---- the stages ----------------------------------------------------------------------------------------------------


def dpo_stage(a: argparse.Namespace, model_dir: Path, out: Path, init_adapter: str | None, info: dict) -> dict:
    import random

    from train.trainers.weighted_dpo import train_dpo

    rng, vocab = random.Random(out.name), SHAPES[a.dpo_shape]["vocab_size"]
    n_prompt, n_chosen, n_rejected = (10, 12, 8) if a.tiny else (150, 300, 250)
    pairs = [{"prompt": words(rng, n_prompt, vocab), "chosen": words(rng, n_chosen, vocab),
              "rejected": words(rng, n_rejected, vocab), "weight": 0.5 + 0.5 * (i % 2)}  # ScPO's vote weights
             for i in range(2 * a.steps)]  # fmt: skip
    kwargs: dict[str, Any] = dict(
        model_path=str(model_dir), pairs=pairs, output_dir=str(out), init_adapter=init_adapter,
        lora=lora(a), beta=0.5, nll_alpha=1.0, seed=0,  # recipes/scpo/*: β=0.5, α=1
        trainer_overrides={"max_steps": a.steps, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                           "learning_rate": 5e-6, "max_length": 128 if a.tiny else 1024, "save_strategy": "no",
                           "gradient_checkpointing": not a.tiny},
    )  # fmt: skip
    if (
        "model_dtype" in inspect.signature(train_dpo).parameters
    ):  # the keyword came with train/trainers/weighted_dpo.py's dtype change
        kwargs["model_dtype"] = "auto"
    info["model_dtype_arg"] = kwargs.get("model_dtype")  # None: the trainer's own default (TRL: float32)
    return train_dpo(**kwargs)


def score_stage(a: argparse.Namespace, model_dir: Path, out: Path, info: dict) -> dict:
    import random

    from train.config import SamplingConfig
    from train.engine import GenParams, HFSampler
    from train.trainers.score_grpo import build_trainer, train_stage

    rng, vocab = random.Random(1), SHAPES[a.score_shape]["vocab_size"]

    def reward(prompts: list, completions: list, **_: Any) -> list[float | None]:
        return [(len(c[0]["content"]) % 3) / 2 for c in completions]  # varies within a group: non-zero advantages

    sampler = HFSampler(model_path=str(model_dir), cfg=SamplingConfig(engine="hf", batch_size=64), seed=0)
    rows = [{"prompt": [{"role": "user", "content": words(rng, 5 if a.tiny else 100, vocab)}], "answer": "7",
             "id": str(i)} for i in range(8)]  # fmt: skip
    kwargs: dict[str, Any] = dict(
        out_dir=out, model_path=str(model_dir), rows=rows, stage=1, steps=a.steps, init_adapter=None, sampler=sampler,
        reward=reward, instruction="There might be an error in the solution above. Correct it. w1 w2",
        gen=GenParams(n=1, temperature=1.0, top_p=1.0, max_tokens=8 if a.tiny else 256),
        beta1=0.01, beta2=0.1, alpha=10.0, lora=lora(a), answer_type="number", seed=0,  # recipes/score/qwen2.5-*
        trainer_overrides={"num_generations": 2 if a.tiny else 4, "per_device_train_batch_size": 4 if a.tiny else 16,
                           "gradient_accumulation_steps": 1, "loss_type": "dapo", "learning_rate": 5e-6,
                           "lr_scheduler_type": "constant", "save_strategy": "no", "gradient_checkpointing": not a.tiny},
    )  # fmt: skip
    if "model_dtype" in inspect.signature(build_trainer).parameters:
        kwargs["model_dtype"] = "auto"
    info["model_dtype_arg"] = kwargs.get("model_dtype")
    try:
        return train_stage(**kwargs)
    finally:
        del sampler, kwargs  # the sampler's model is part of the stage: freed before memory is read


def lora(a: argparse.Namespace) -> dict[str, Any]:
    r = 4 if a.tiny else 64  # recipes: r=64, α=128, all-linear
    return {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": "all-linear"}


def zero3_stage(a: argparse.Namespace, work: Path, out: Path, deadline: float) -> dict[str, Any]:
    """dpo_iter1 in a fresh process under accelerate's launcher with the shipped ZeRO-3 config, on one process.

    A subprocess because DeepSpeed must own the process group and model construction (zero.Init) from the start,
    and the stages before left accelerate's singletons set up for one plain device."""
    import torch
    import yaml

    cfg = yaml.safe_load((ROOT / "recipes/accelerate/zero3.yaml").read_text())
    cfg["num_processes"] = 1
    if not torch.cuda.is_available():
        cfg["mixed_precision"] = "no"  # bf16 is a GPU setting (as tests/launch/test_distributed.py runs it on CPU)
    (work / "zero3-1proc.yaml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:  # a free port: the default 29500 may be taken by a concurrent launch
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = work / "zero3_record.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(work / "zero3-1proc.yaml"),
           "--num_processes", "1", "--main_process_port", str(port), __file__, "--worker", "zero3",
           "--work", str(work), "--out", str(out), "--steps", str(a.steps), "--dpo-shape", a.dpo_shape,
           *(["--tiny"] if a.tiny else [])]  # fmt: skip
    log = out / "zero3.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(deadline - time.time(), 1)
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = [s for s in log.read_text(errors="replace").splitlines() if s.strip()]
    print("\n".join(tail[-40:]) if rc else f"zero3: worker log in {log}")
    if result.is_file():
        rec = json.loads(result.read_text())
    else:
        rec = {"status": "failed", "error": f"worker exit {rc}: {tail[-1] if tail else '(no output)'}"[:500]}
    return rec | {"process_wall_s": round(time.perf_counter() - t0, 2)}


def zero3_unavailable() -> str | None:
    """Why ZeRO-3 cannot run here, or None."""
    import torch

    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed and not in the wheelhouse"
    if not torch.cuda.is_available() and not (shutil.which("c++") or shutil.which("g++")):
        return "DeepSpeed on CPU JIT-builds its comm op and needs a C++ compiler (apt-get install g++)"
    return None


def zero3_worker(a: argparse.Namespace) -> None:
    """Inside `accelerate launch`: one DeepSpeed ZeRO-3 DPO iteration; the parent reads WORK/zero3_record.json."""
    work = Path(a.work)
    rec = run_stage(lambda info: dpo_stage(a, work / f"model-{a.dpo_shape}", work / "zero3", None, info))
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:  # unset when the stage failed before TRL built its Accelerator
        state = AcceleratorState()
        plugin = state.deepspeed_plugin
        rec["engine"] = f"{state.distributed_type.value}" + (f" ZeRO-{plugin.zero_stage}" if plugin else "")
    (work / "zero3_record.json").write_text(json.dumps(rec))


# ---- main ----------------------------------------------------------------------------------------------------------


def write(out: Path, report: dict[str, Any]) -> None:
    tmp = out / "gpu_smoke.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "gpu_smoke.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_smoke", help="gpu_smoke.json and zero3.log go here")
    p.add_argument("--work", help="models, adapters, installed wheels (default: a temp dir, removed at the end)")
    p.add_argument("--wheelhouse", default=str(ROOT / ".wheelhouse"), help="built by scripts/build_wheelhouse.sh")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the CPU dry run")
    p.add_argument("--steps", type=int, help="optimizer steps per stage (default 3, tiny 2)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--dpo-shape", help="dpo_iter1/2 and zero3 (default llama3-8b, the scpo/meta_rewarding recipes)")
    p.add_argument("--score-shape", help="score_stage1 (default qwen2.5-1.5b, recipes/score)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stages that would start later are skipped")
    p.add_argument("--worker", choices=["zero3"], help=argparse.SUPPRESS)
    a = p.parse_args()
    a.steps = a.steps or (2 if a.tiny else 3)
    a.dpo_shape = a.dpo_shape or ("tiny-llama" if a.tiny else "llama3-8b")
    a.score_shape = a.score_shape or ("tiny-qwen2" if a.tiny else "qwen2.5-1.5b")
    sys.path.insert(0, str(ROOT))  # `train` without an installed distribution
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        install_missing(Path(a.wheelhouse), Path(a.work) / "site-packages")  # the parent installed: adds the path
        return zero3_worker(a)

    start = time.time()
    deadline = start + a.budget_s
    work = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in a.stages.split(",") if s.strip()]
    if unknown := set(wanted) - set(STAGES):
        p.error(f"unknown stages {sorted(unknown)}")
    installed, install_error = install_missing(Path(a.wheelhouse), work / "site-packages")
    import torch

    report: dict[str, Any] = {
        "tiny": a.tiny, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": sys.version.split()[0], "installed_from_wheelhouse": installed,
        "install_error": install_error,
        "versions": {d: version(d) for d in VERSIONS}, "shapes": {"dpo": a.dpo_shape, "score": a.score_shape},
        "steps": a.steps, "stages": {},
    }  # fmt: skip
    t0 = time.perf_counter()
    try:
        for shape in {a.dpo_shape, a.score_shape}:
            build_model_dir(shape, work / f"model-{shape}")
    except Exception as e:  # still write the JSON: it is all a GPU run brings back
        traceback.print_exc()
        report["setup_error"] = traceback.format_exception_only(type(e), e)[-1].strip()[:500]
        wanted = []
    report["setup_s"] = round(time.perf_counter() - t0, 2)
    stages = report["stages"]
    dpo_model = work / f"model-{a.dpo_shape}"
    runners = {  # zero3 runs in its own process (zero3_stage)
        "dpo_iter1": partial(dpo_stage, a, dpo_model, work / "iter_1", None),
        "dpo_iter2": partial(dpo_stage, a, dpo_model, work / "iter_2", str(work / "iter_1" / "adapter")),
        "score_stage1": partial(score_stage, a, work / f"model-{a.score_shape}", work / "score"),
    }
    minimum = {"zero3": 20 if a.tiny else 120}  # seconds a stage needs at least, else skipped
    for name in STAGES:
        left = deadline - time.time()
        if name not in wanted:
            why = "setup failed" if "setup_error" in report else "not in --stages"
            stages[name] = {"status": "skipped", "reason": why}
        elif left < minimum.get(name, 5 if a.tiny else 45):
            stages[name] = {"status": "skipped", "reason": f"time budget: {left:.0f}s of --budget-s left"}
        elif name == "dpo_iter2" and stages.get("dpo_iter1", {}).get("status") != "ok":
            stages[name] = {"status": "skipped", "reason": "needs dpo_iter1's adapter"}
        elif name == "zero3" and (why := zero3_unavailable()):
            stages[name] = {"status": "skipped", "reason": why}
        else:
            print(f"gpu_smoke: stage {name}", flush=True)
            stages[name] = zero3_stage(a, work, out, deadline) if name == "zero3" else run_stage(runners[name])
            stages[name]["model"] = a.score_shape if name == "score_stage1" else a.dpo_shape
        print(f"gpu_smoke: {name}: {json.dumps(stages[name])}", flush=True)
        report["total_s"] = round(time.time() - start, 1)
        write(out, report)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_smoke: wrote {out / 'gpu_smoke.json'} in {report['total_s']}s")


if __name__ == "__main__":
    main()
