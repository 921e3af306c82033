"""The iteration loop's plumbing: phases that skip when their artifact exists, timings, metrics.

An algorithm module calls `run.phase(k, name, artifact, fn, reads=..., after=...)` for each step of its algorithm
box. `fn` writes `artifact` (atomically) and returns metrics; on rerun a finished phase whose inputs are unchanged
is skipped and its recorded metrics are reused, so re-running the same command resumes, and a phase whose inputs
changed (a recipe edit) is redone with everything downstream of it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.config import Recipe, algorithm, recipe_to_dict
from train.data import Item, conversation
from train.engine import Sampler, ShardedSampler, get_sampler, render_prompts
from train.errors import NonFiniteLossError, StopRun
from train.models import load_tokenizer, resolve_model
from train.runtime import distributed as dist
from train.runtime.artifacts import (
    Staged,
    adapter_complete,
    artifact_complete,
    fault,
    head_jsonl,
    read_json,
    write_json,
    write_jsonl,
)
from train.runtime.fingerprints import RESULT_VERSION, describe_changes, digest, recipe_value

log = logging.getLogger("selfreward")

# Recipe keys that change what the model is shown, how the engine samples, and how a trainer trains: the inputs
# shared by many phases (train/runtime/fingerprints.py). Engine sizing keys (batch size, KV cache) change no result.
PROMPT_KEYS = ("data.instruction", "data.system_prompt", "data.answer_type", "sampling.max_model_len")
ENGINE_KEYS = ("sampling.engine", "sampling.dtype", "sampling.lora_sync", "seed", "trust_remote_code")
TRAIN_KEYS = ("trainer", "lora", "seed", "model_dtype", "trust_remote_code")
EVAL_KEYS = ("eval.num_samples", "eval.temperature", "eval.top_p")


def items_digest(items: list[Item]) -> str:
    """What a phase needs to know about its prompts: their ids, text and gold answers."""
    return digest([(it["id"], it["prompt"], it.get("answer")) for it in items])


def _is_engine_dead(e: BaseException) -> bool:
    """vLLM's engine process died mid-generation (only an in-process vLLM raises it; vLLM is imported only then)."""
    import sys

    if "vllm" not in sys.modules:
        return False
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(e, EngineDeadError)


def _is_oom(e: BaseException) -> bool:
    """CUDA OOM (torch.OutOfMemoryError), Python's MemoryError, or torch's CPU allocator giving up."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))


class Run:
    """Everything one `selfreward run` shares across phases: paths, the engine, the tracker."""

    def __init__(self, recipe: Recipe, dry_run: bool = False, model_path: str | None = None):
        """`dry_run`: `selfreward status` (compute each phase's state, run and write nothing). `model_path`: an
        already resolved model (tests of the bookkeeping pass any string)."""
        self.recipe = recipe
        self.out = Path(recipe.output_dir)
        self.is_main = dist.is_main()
        self.dry_run = dry_run
        if self.is_main and model_path is None:
            model_path = resolve_model(recipe.model)  # converts the embedded GGUF once, on one rank
        if self.is_main and not dry_run:
            self.out.mkdir(parents=True, exist_ok=True)
        self.model_path: str = dist.broadcast(model_path)
        self._sampler: Sampler | None = None
        self.tracker = None
        self.report_to = "wandb" if recipe.logging.wandb and self.is_main else "none"
        self.skipped_prompts: dict[str, int] = {}  # split -> prompts dropped for not fitting the context
        self._rank0_phase: str | None = None  # the rank-0-only phase running now, if any
        self._tree = recipe_to_dict(recipe)
        self._fingerprints: dict[tuple[int, str], str] = {}  # (iteration, phase) -> this run's input digest
        self._ran: set[str] = set()  # "iter_k/phase" executed by this process: what depends on them is redone
        self.redo: set[str] = set()  # `--redo PHASE` or `--redo K:PHASE`
        self.status: list[dict[str, Any]] = []

    def iter_dir(self, k: int) -> Path:
        return self.out / f"iter_{k}"

    def adapter(self, k: int) -> Path | None:
        """The adapter that iteration k+1 starts from (None = base model, or iteration k's adapter is not whole).
        k = 0: the SFT seed adapter when `sft.enabled` (M1 = SFT(M0), train/algorithms/sft_seed.py), else the base."""
        path = self.iter_dir(k) / "adapter"
        if k < 0 or (k == 0 and not self.recipe.sft.enabled) or not path.is_dir():
            return None
        if not adapter_complete(path):  # truncated by a power loss: its train phase redoes it
            log.warning("%s is incomplete (truncated safetensors or config); not using it", path)
            return None
        return path

    @property
    def sampler(self) -> Sampler:
        # Built on first use only: a fully resumed iteration never starts the engine.
        if self._sampler is None:
            r = self.recipe
            if self._rank0_phase is not None and dist.world_size() > 1:
                # Building a vLLM engine under the external launcher is collective: rank 0 alone would wait forever
                # for ranks parked in the phase's closing barrier. Sampler phases run with all_ranks=True.
                raise RuntimeError(
                    f"phase `{self._rank0_phase}` runs on rank 0 only but needs the sampling engine, which every rank "
                    "must build together; run it with all_ranks=True"
                )
            try:
                self._sampler = get_sampler(self.model_path, r.sampling, r.lora.r, r.seed, r.trust_remote_code)
            except (RuntimeError, ValueError, MemoryError) as e:
                if r.sampling.engine == "server":
                    raise StopRun(
                        f"no vLLM server to sample from ({e}). Start one (README: vLLM server) or fix "
                        f"sampling.server_url (now {r.sampling.server_url})"
                    ) from e
                raise StopRun(
                    f"the {r.sampling.engine} sampling engine failed to start ({type(e).__name__}: {e}); the engine's "
                    f"log above names the cause. Usual fixes: set sampling.kv_cache_gib (now {r.sampling.kv_cache_gib}) to "
                    f"size the KV cache directly, or change sampling.gpu_memory_utilization (now "
                    f"{r.sampling.gpu_memory_utilization}; it must cover the weights plus the KV cache, so too low "
                    "fails as well as too high), lower sampling.max_model_len, free memory held by other processes, "
                    "or use sampling.engine=hf"
                ) from e
        return self._sampler

    def sample_with(self, k: int) -> None:
        """Load the adapter iteration k published into the engine (the base model for k = 0)."""
        self.sampler.set_adapter(str(self.adapter(k)) if self.adapter(k) else None)

    @property
    def sharded_sampler(self) -> Sampler:
        """The engine, sampling this rank's shard of every call (evaluation: all ranks share the work)."""
        return ShardedSampler(self.sampler)

    def fit_context(self, items: list[Item], split: str, reserve: int) -> list[Item]:
        """Drop prompts that leave fewer than `reserve` tokens of `sampling.max_model_len` for the model's
        turns, count them in metrics.jsonl and list them in `skipped_<split>_prompts.jsonl`."""
        r = self.recipe
        if not items:
            return items
        limit = r.sampling.max_model_len - reserve
        # Its own tokenizer, loaded once (0.3-0.6 s): a resumed run may never start the engine.
        tokenizer = getattr(self, "_tokenizer", None) or load_tokenizer(self.model_path, r.trust_remote_code)
        self._tokenizer = tokenizer
        lengths = [len(ids) for ids in render_prompts(tokenizer, [conversation(it, r.data) for it in items])]
        kept = [it for it, n in zip(items, lengths) if n <= limit]
        skipped = [{"id": it["id"], "prompt_tokens": n} for it, n in zip(items, lengths) if n > limit]
        self.skipped_prompts[split] = len(skipped)
        if skipped:
            log.warning(
                "skipped %d of %d %s prompts longer than %d tokens (sampling.max_model_len %d minus %d for the "
                "answer); listed in %s", len(skipped), len(items), split, limit, r.sampling.max_model_len, reserve,
                self.out / f"skipped_{split}_prompts.jsonl",
            )  # fmt: skip
            if self.is_main and not self.dry_run:
                write_jsonl(self.out / f"skipped_{split}_prompts.jsonl", skipped)
        if not kept:
            raise StopRun(
                f"every {split} prompt ({len(items)}) is longer than {limit} tokens, so none leaves room for an "
                f"answer; raise sampling.max_model_len (now {r.sampling.max_model_len}) or use shorter prompts"
            )
        return kept

    def sampler_sleep(self) -> None:
        """Free the engine's GPU memory for the trainer (no-op on CPU or before first use)."""
        if self._sampler is not None:
            self._sampler.sleep()

    def phase(
        self,
        k: int,
        name: str,
        artifact: Path,
        fn: Callable[[], dict[str, Any]],
        all_ranks: bool = False,
        *,
        reads: tuple[str, ...] = (),
        after: tuple[str, ...] = (),
        adapter: int | None = None,
        values: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Run `fn` unless `artifact` exists and was made from the same inputs. Rank 0 alone runs it unless `all_ranks`
        (sharded generation and evaluation, distributed training: every phase that uses the engine); either way only
        rank 0 writes, and ranks meet after.

        Inputs (train/runtime/fingerprints.py): the recipe keys it `reads`, computed `values`, the phases of
        iteration k it comes `after`, and the training phase of iteration `adapter` whose adapter it uses."""
        metrics_path = self.iter_dir(k) / "phases" / f"{name}.json"
        inputs = self._inputs(k, reads, after, adapter, values)
        self._fingerprints[(k, name)] = digest(inputs)
        state, why = dist.broadcast(self._state(k, name, artifact, inputs) if self.is_main else None)
        if self.dry_run:
            self.status.append({"iteration": k, "phase": name, "state": state, "why": why})
            return read_json(metrics_path)["metrics"] if state == "done" and metrics_path.exists() else {}
        if state == "done":
            if self.is_main:
                log.info("iter %d: %s done (%s), skipping", k, name, artifact.name)
            return read_json(metrics_path)["metrics"] if metrics_path.exists() else {}
        if self.is_main:
            if state == "stale":
                log.info("iter %d: %s is stale (%s); redoing it and what depends on it", k, name, why)
            self._clear(k, name, artifact, inputs)
            log.info("iter %d: %s ...", k, name)
        dist.barrier()
        self._ran.add(f"iter_{k}/{name}")
        start = time.perf_counter()
        self._rank0_phase = None if all_ranks else name
        try:
            with Staged(artifact, owner=self.is_main) as staged:  # fn's publish of `artifact` waits for the metrics
                metrics = fn() if (all_ranks or self.is_main) else {}
        except Exception as e:
            if _is_oom(e):
                raise StopRun(self._oom_advice(k, name, e)) from e
            if isinstance(e, NonFiniteLossError):
                raise StopRun(
                    f"iter {k}: {e}. Nothing of this iteration was published. Lower trainer.learning_rate (now "
                    f"{self.recipe.trainer.get('learning_rate', 'default')}) or check the pairs in iter_{k}"
                ) from e
            if _is_engine_dead(e):
                raise StopRun(
                    f"iter {k}: the vLLM engine died during phase `{name}`; finished chunks are kept and a rerun "
                    "resumes. If it ran out of memory, lower sampling.gpu_memory_utilization or sampling.batch_size"
                ) from e
            raise
        finally:
            self._rank0_phase = None
        seconds = time.perf_counter() - start
        if self.is_main:
            # Written before the artifact is published: a published artifact always has its metrics. A kill in
            # between leaves it staged, unpublished, and its partial files in place: the rerun redoes the phase.
            fault(f"phase_metrics:{name}")
            write_json(metrics_path, {"metrics": metrics, "seconds": seconds})
            if not staged.publish() and not artifact.exists():  # exists: written around the artifacts module
                raise RuntimeError(f"phase {name} finished without writing {artifact}")
            log.info("iter %d: %s took %.1fs %s", k, name, seconds, _short(metrics))
        dist.barrier()
        return dist.broadcast(metrics)

    def _inputs(self, k: int, reads: tuple[str, ...], after: tuple[str, ...], adapter: int | None,
                values: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        inputs: dict[str, Any] = {"model": self.recipe.model, "result_version": RESULT_VERSION}
        inputs |= {key: recipe_value(self._tree, key) for key in reads}
        inputs |= {f"={key}": value for key, value in (values or {}).items()}
        upstream = [f"iter_{k}/{n}" for n in after] + ([f"iter_{adapter}/train"] if adapter else [])
        if adapter == 0 and self.recipe.sft.enabled:  # the SFT seed adapter; without SFT the inputs stay as they were
            upstream.append("iter_0/sft")
        for ref in upstream:
            j, n = int(ref.split("/")[0].removeprefix("iter_")), ref.split("/")[1]
            inputs[f"<{ref}"] = self._fingerprints.get((j, n), "absent")
        return inputs

    def _state(self, k: int, name: str, artifact: Path, inputs: dict[str, Any]) -> tuple[str, str]:
        """("done" | "stale" | "missing", why): whether `artifact` can be reused for these inputs."""
        recorded = self.iter_dir(k) / "phases" / "inputs" / f"{name}.json"
        if not artifact_complete(artifact):  # an adapter must also be whole (artifacts.adapter_complete)
            return "missing", "not run yet"
        if name in self.redo or f"{k}:{name}" in self.redo:
            return "stale", "--redo"
        redone = [ref for ref in inputs if ref.startswith("<") and ref[1:] in self._ran]
        if redone:
            return "stale", f"input {redone[0][1:]} was redone"
        if not recorded.exists():
            # Made by a selfreward before phases recorded their inputs, or placed by hand: adopt it and record the
            # inputs now (resuming an older run after an upgrade keeps its work; later edits are then detected).
            if not self.dry_run:
                write_json(recorded, {"fingerprint": digest(inputs), "inputs": inputs})
            return "done", "adopted: no record of its inputs, recorded now"
        old = read_json(recorded)
        if old.get("fingerprint") == digest(inputs):
            return "done", ""
        return "stale", describe_changes(old.get("inputs", {}), inputs)

    def _clear(self, k: int, name: str, artifact: Path, inputs: dict[str, Any]) -> None:
        """Before running a phase: drop its old artifact, and partial work made from other inputs; record the new
        inputs (a published artifact was always made from the inputs recorded next to it)."""
        recorded = self.iter_dir(k) / "phases" / "inputs" / f"{name}.json"
        fingerprint = digest(inputs)
        same = recorded.exists() and read_json(recorded).get("fingerprint") == fingerprint and not artifact.exists()
        if artifact.is_dir():
            shutil.rmtree(artifact)
        artifact.unlink(missing_ok=True)
        (self.iter_dir(k) / "phases" / f"{name}.json").unlink(missing_ok=True)
        if not same:  # resume partial work only when it was made from these inputs
            for partial in artifact.parent.glob(artifact.name + ".*partial"):
                partial.unlink()
            for leftover in ("checkpoints", "rollouts", "rollout_adapter") if name in ("train", "sft") else ():
                shutil.rmtree(artifact.parent / leftover, ignore_errors=True)
            write_json(recorded, {"fingerprint": fingerprint, "inputs": inputs})  # a resumed phase keeps its record

    def _oom_advice(self, k: int, name: str, e: BaseException) -> str:
        t = self.recipe.trainer
        where = f"iter {k}: phase `{name}` ran out of memory ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        if name != "train":
            return f"{where}. Lower sampling.batch_size or sampling.max_model_len; a rerun resumes"
        return (
            f"{where}. Nothing of this iteration was published and a rerun resumes. To fit: lower "
            f"trainer.per_device_train_batch_size (now {t.get('per_device_train_batch_size', 'default')}) and raise "
            "trainer.gradient_accumulation_steps, set trainer.gradient_checkpointing=true, lower trainer.max_length, "
            "or shard the model with ZeRO-3 (accelerate launch --config_file recipes/accelerate/zero3.yaml)"
        )

    def iteration_row(self, k: int) -> dict[str, Any]:
        row: dict[str, Any] = {"iteration": k}
        row.update({f"data/skipped_{split}_prompts": n for split, n in self.skipped_prompts.items()})
        phases = self.iter_dir(k) / "phases"
        for path in sorted(phases.glob("*.json")) if phases.exists() else []:
            rec = read_json(path)
            row.update({f"{path.stem}/{key}": v for key, v in rec["metrics"].items()})
            row[f"time/{path.stem}_s"] = round(rec["seconds"], 3)
        return row

    def write_metrics(self, upto: int) -> list[dict[str, Any]]:
        """Rewrite metrics.jsonl with one row per finished iteration (idempotent under resume)."""
        if not self.is_main or self.dry_run:
            return []
        rows = [self.iteration_row(k) for k in range(0, upto + 1) if (self.iter_dir(k) / "phases").exists()]
        write_jsonl(self.out / "metrics.jsonl", rows)
        if self.tracker is not None and rows:
            self.tracker.log_iteration(rows[-1])
            for name in algorithm(self.recipe).samples:  # the first `logging.log_samples` rows of each
                path = self.iter_dir(rows[-1]["iteration"]) / name
                if path.is_file():
                    self.tracker.log_samples(f"samples/{path.stem}", head_jsonl(path, self.recipe.logging.log_samples))
        return rows


def _short(metrics: dict[str, Any]) -> str:
    keep = {
        k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items() if not isinstance(v, (dict, list))
    }
    return str(dict(list(keep.items())[:6])) if keep else ""
