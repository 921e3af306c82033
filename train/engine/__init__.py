"""Sampling engines behind one interface (`Sampler`): vLLM in-process (default), HF `generate`, or a vLLM server.

`get_sampler` builds this process's engine once and reuses it across phases and iterations.
"""

from __future__ import annotations

import functools
import logging
import os
import time

from train.config import SamplingConfig
from train.engine.base import (
    VLLM_LORA_RANKS,
    Conversation,
    GenParams,
    Sample,
    Sampler,
    ShardedSampler,
    generate_together,
    render_prompts,
    skip_overlong,
)
from train.engine.hf import HFSampler
from train.engine.vllm import VLLMSampler, free_accelerator_memory

__all__ = [
    "VLLM_LORA_RANKS", "Conversation", "GenParams", "HFSampler", "Sample", "Sampler", "ShardedSampler",
    "VLLMSampler", "close_sampler", "engine_stats", "free_accelerator_memory", "generate_together", "get_sampler", "render_prompts", "skip_overlong",
]  # fmt: skip

_ENGINE: Sampler | None = None
_ENGINE_KEY: tuple | None = None


_STATS: dict[str, float | None] = {}  # timings of the last engine this process closed (scripts/bench.py)


def close_sampler(release_memory: bool = True) -> None:
    """Shut down this process's engine at the end of a command; a later `get_sampler` builds a new one.

    `release_memory=False` when the process exits next: the engine stops without the garbage collections that
    hand its memory back for later use (`VLLMSampler.close`)."""
    global _ENGINE, _ENGINE_KEY
    engine, close = _ENGINE, getattr(_ENGINE, "close", None)
    if isinstance(engine, VLLMSampler):
        close = functools.partial(engine.close, release_memory=release_memory)
    _ENGINE = _ENGINE_KEY = None
    if engine is not None:
        _STATS.clear()
        _STATS.update(engine_start_s=getattr(engine, "engine_start_s", None),
                      engine_generate_s=getattr(engine, "generate_s", None))  # fmt: skip
    start = time.perf_counter()
    if close is not None:
        try:
            close()
        except Exception as e:  # a dead engine (e.g. OOM-killed worker) must not mask the run's own outcome
            logging.getLogger("selfreward").warning("engine shutdown failed: %s: %s", type(e).__name__, e)
    if engine is not None:
        _STATS["engine_close_s"] = time.perf_counter() - start


def engine_stats() -> dict[str, float | None]:
    """Start, generate and close seconds of the last engine `close_sampler` shut down ({} if none)."""
    return dict(_STATS)


def get_sampler(
    model_path: str, cfg: SamplingConfig, lora_rank: int, seed: int, trust_remote_code: bool = False
) -> Sampler:
    """Build the engine once per process and reuse it across phases and iterations."""
    global _ENGINE, _ENGINE_KEY
    # Every engine setting is in the key: a later phase asking for another dtype or TP size gets a new engine.
    key = (model_path, cfg.model_dump_json(exclude={"temperature", "top_p", "max_tokens"}), lora_rank, seed,
           trust_remote_code)  # fmt: skip
    if _ENGINE is not None and _ENGINE_KEY == key:
        return _ENGINE
    if cfg.engine == "vllm":
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        _ENGINE = VLLMSampler(model_path, cfg, lora_rank, seed, trust_remote_code)
    elif cfg.engine == "server":
        from train.engine.server import ServerSampler

        _ENGINE = ServerSampler(model_path, cfg, seed, trust_remote_code)
    else:
        _ENGINE = HFSampler(model_path, cfg, seed, trust_remote_code)
    _ENGINE_KEY = key
    return _ENGINE
