"""A checkpoint's weights with a PEFT LoRA adapter merged in, for engines that sample merged weights
(`sampling.lora_sync: merge`).

W' = W + scale * B @ A per adapted module (LoRA, Hu et al. 2021, eq. 3; PEFT's `merge`), with PEFT's scale:
`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA, `rank_pattern` / `alpha_pattern` per module. The sum is
taken in float32 from the checkpoint's own tensors, so the engine rounds each merged weight once to its dtype: the
model a merged checkpoint loaded in that dtype would be (what TRL's merge-and-push sends to vLLM).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ADAPTER_FILE = "adapter_model.safetensors"
# PEFT adapter options whose weights are not W + scale * B @ A, refused rather than merged wrongly.
_UNMERGEABLE = ("use_dora", "lora_bias", "modules_to_save", "fan_in_fan_out", "trainable_token_indices")


def adapter_key(adapter_path: str | os.PathLike | None) -> tuple[str, int, int, int, int] | None:
    """What identifies an adapter's weights on disk: path, inode, size, mtime and ctime of its safetensors file. A
    run that rewrites an adapter in place (a resumed iteration) gets a new key, so the engine merges it again (ctime
    moves on every write, whatever a writer does to mtime)."""
    if adapter_path is None:
        return None
    f = Path(adapter_path) / ADAPTER_FILE
    try:
        st = f.stat()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{f}: no such file; merging an adapter into the engine's weights needs a safetensors PEFT adapter"
        ) from None
    return (str(Path(adapter_path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _checkpoint_files(model_path: str) -> list[Path]:
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return [root / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root}: no *.safetensors checkpoint to merge an adapter into")
    return files


def adapter_modules(adapter_path: str | os.PathLike | None) -> frozenset[str]:
    """The checkpoint modules an adapter adapts (e.g. `model.layers.0.self_attn.q_proj`), from its file's header."""
    if adapter_path is None:
        return frozenset()
    from safetensors import safe_open

    with safe_open(str(Path(adapter_path) / ADAPTER_FILE), framework="pt") as st:
        return frozenset(n.rpartition(".lora_")[0].removeprefix("base_model.model.") for n in st.keys())  # noqa: SIM118


def with_packed_siblings(modules: frozenset[str], packed: dict[str, list[str]]) -> frozenset[str]:
    """`modules` plus the modules an engine packs with them into one layer (vLLM's `packed_modules_mapping`, e.g.
    q/k/v -> qkv_proj): a packed layer is reloaded whole, so its unadapted parts must come along."""
    out = set(modules)
    for module in modules:
        prefix, _, leaf = module.rpartition(".")
        for members in packed.values():
            if leaf in members:
                out.update(f"{prefix}.{m}" if prefix else m for m in members)
    return frozenset(out)


def adapter_deltas(adapter_path: str | os.PathLike) -> dict[str, Any]:
    """{checkpoint weight name: scale * B @ A in float32} for every module the adapter adapts."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    cfg_path = Path(adapter_path) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters can be merged")
    for key in _UNMERGEABLE:
        if cfg.get(key):
            raise ValueError(
                f"{cfg_path}: `{key}` is set; merging supports plain LoRA (use sampling.lora_sync: adapter)"
            )
    tensors = load_file(str(Path(adapter_path) / ADAPTER_FILE))
    pairs: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(f"{adapter_path}/{ADAPTER_FILE}: tensor {name!r} is not a LoRA A/B weight")
        pairs.setdefault(module.removeprefix("base_model.model."), {})[kind[0]] = t
    r, alpha = cfg["r"], cfg["lora_alpha"]
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    deltas = {}
    for module, ab in pairs.items():
        rank = ranks.get(get_pattern_key(ranks.keys(), module), r)
        a = alphas.get(get_pattern_key(alphas.keys(), module), alpha)
        scale = a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
        deltas[f"{module}.weight"] = (ab["B"].float() @ ab["A"].float()) * scale
    return deltas


def merged_weights(
    model_path: str, adapter_path: str | os.PathLike | None, dtype: Any = None, only: frozenset[str] | None = None
) -> Iterator[tuple[str, Any]]:
    """The checkpoint's tensors (one at a time, memory-mapped), float32 + delta where the adapter adapts the weight;
    the checkpoint unchanged for `adapter_path=None`. `dtype`: floating tensors rounded to it (the engine's), as
    the engine's loader would round them. `only`: just the tensors of these modules (None: all). Checked before the first tensor is read: a bad adapter raises
    here, never halfway through an engine's reload."""
    from safetensors import safe_open

    deltas = adapter_deltas(adapter_path) if adapter_path is not None else {}
    files = _checkpoint_files(model_path)
    names = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    if missing := sorted(set(deltas) - names):  # before any weight reaches the engine
        raise ValueError(f"{adapter_path}: adapted modules missing from the checkpoint {model_path}: {missing}")
    return _stream(files, deltas, dtype, only)


def _stream(
    files: list[Path], deltas: dict[str, Any], dtype: Any, only: frozenset[str] | None
) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if only is not None and name.rpartition(".")[0] not in only:
                    continue
                t = st.get_tensor(name)
                t = t if name not in deltas else t.float() + deltas[name]
                yield name, t.to(dtype) if dtype is not None and t.is_floating_point() else t


def reload_merged(worker: Any, model_path: str, adapter_path: str | None, modules: frozenset[str] | None) -> None:
    """Runs inside each vLLM worker (`collective_rpc`): the checkpoint merged with the adapter, read there, so a
    worker in another process never receives tensors through the RPC. `modules`: reload only these (with what
    the engine packs beside them); the other layers keep their weights (vLLM's reload puts back a layer it got
    nothing for). None: every weight."""
    from train.engine import vllm_cpu_logits

    model = worker.model_runner.get_model()
    only = None if modules is None else with_packed_siblings(modules, getattr(model, "packed_modules_mapping", {}))
    weights = merged_weights(model_path, adapter_path, dtype=worker.model_config.dtype, only=only)
    # Layers with nothing to load (rotary caches, an LM head tied to the embedding, layers outside `modules`) keep
    # their tensors, and vLLM warns about each, and lists every weight it did not get, at every reload.
    quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        worker.model_runner.reload_weights(weights_iterator=weights)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    vllm_cpu_logits.forget_weights(model)
