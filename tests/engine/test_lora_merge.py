"""Merging a PEFT adapter into the checkpoint's weights (sampling.lora_sync: merge) against PEFT's own merge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from train.engine.lora_merge import adapter_deltas, adapter_key, merged_weights


def _adapter(model_dir: str, out: Path, seed: int, **lora: object) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(init_lora_weights=False, **{"r": 8, "lora_alpha": 16, "target_modules": "all-linear"} | lora)
    peft = get_peft_model(model, cfg)
    peft.save_pretrained(str(out))
    return out


def _peft_merged(model_dir: str, adapter: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter))
    return model.merge_and_unload().state_dict()


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True},
        # per-module rank and alpha: PEFT's patterns, matched on the module name
        {"r": 4, "rank_pattern": {"q_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 3}},
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_merged_weights_are_pefts_merge(tiny_model_dir, tmp_path, lora):
    import torch

    adapter = _adapter(tiny_model_dir, tmp_path / "a", 0, **lora)
    ours = dict(merged_weights(tiny_model_dir, adapter))
    theirs = _peft_merged(tiny_model_dir, adapter)
    changed = [n for n in ours if not torch.equal(ours[n], _base(tiny_model_dir)[n])]
    # every linear layer of both blocks is adapted (q k v o gate up down), nothing else changes
    assert len(changed) == 2 * 7 and all(n.endswith("_proj.weight") for n in changed)
    for name, t in ours.items():
        torch.testing.assert_close(t, theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def _base(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_no_adapter_is_the_checkpoint(tiny_model_dir):
    import torch

    base = _base(tiny_model_dir)
    ours = dict(merged_weights(tiny_model_dir, None))
    assert ours.keys() == base.keys() and all(torch.equal(ours[n], base[n]) for n in base)


@pytest.mark.parametrize(("key", "value"), [("use_dora", True), ("modules_to_save", ["lm_head"])])
def test_adapters_that_are_not_plain_lora_are_refused_by_name(tiny_model_dir, tmp_path, key, value):
    adapter = _adapter(tiny_model_dir, tmp_path / "a", 0)
    cfg_path = adapter / "adapter_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {key: value}))
    with pytest.raises(ValueError, match=f"`{key}` is set"):
        adapter_deltas(adapter)


def test_an_adapter_for_another_model_fails_before_any_weight_is_read(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _adapter(tiny_model_dir, tmp_path / "a", 0)
    f = adapter / "adapter_model.safetensors"
    tensors = load_file(str(f))
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, str(f))
    with pytest.raises(ValueError, match=r"missing from the checkpoint .*layers\.7\.mlp\.down_proj\.weight"):
        merged_weights(tiny_model_dir, adapter)  # raises on the call, not on the first next()


def test_adapter_key_changes_when_the_adapter_is_rewritten(tiny_model_dir, tmp_path):
    adapter = _adapter(tiny_model_dir, tmp_path / "a", 0)
    key = adapter_key(adapter)
    assert adapter_key(adapter) == key and adapter_key(None) is None
    st = os.stat(adapter / "adapter_model.safetensors")
    _adapter(tiny_model_dir, adapter, 1)  # same path, new weights (a resumed iteration retrained)
    os.utime(adapter / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # even with mtime put back
    assert adapter_key(adapter) != key
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: no such file"):
        adapter_key(tmp_path / "nowhere")


def test_dtype_rounds_the_float32_sum_once(tiny_model_dir, tmp_path):
    import torch

    adapter = _adapter(tiny_model_dir, tmp_path / "a", 0)
    full = dict(merged_weights(tiny_model_dir, adapter))
    low = dict(merged_weights(tiny_model_dir, adapter, dtype=torch.bfloat16))
    assert all(low[n].dtype == torch.bfloat16 and torch.equal(low[n], full[n].bfloat16()) for n in full)


def test_only_the_named_modules_and_their_packed_siblings(tiny_model_dir, tmp_path):
    from train.engine.lora_merge import adapter_modules, with_packed_siblings

    adapter = _adapter(tiny_model_dir, tmp_path / "a", 0, target_modules=["q_proj", "up_proj"])
    modules = adapter_modules(adapter)
    assert modules == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.up_proj")}
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    only = with_packed_siblings(modules, packed)
    assert len(only) == 2 * 5 and "model.layers.1.self_attn.v_proj" in only and "model.layers.0.mlp.gate_proj" in only
    assert adapter_modules(None) == frozenset()
    got = dict(merged_weights(tiny_model_dir, adapter, only=only))
    assert sorted(got) == sorted(f"{m}.weight" for m in only)
    full = dict(merged_weights(tiny_model_dir, adapter))
    assert all(got[n] is not None and (got[n] == full[n]).all() for n in got)
