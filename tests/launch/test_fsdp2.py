"""FSDP2 (recipes/accelerate/fsdp2.yaml): the config as accelerate reads it, the adapter gathered from DTensor shards
over 2 gloo ranks, and whole ScPO / SCoRe runs with a CPU copy of the shipped config.

accelerate 1.15 never turns FSDP on for CPU ranks: `AcceleratorState.__init__` switches to `DistributedType.FSDP`
only inside `elif self.distributed_type in [MULTI_GPU, MULTI_NPU, ...]` (accelerate/state.py:986-1013), and CPU
ranks are MULTI_CPU, so an FSDP config silently trains them as DDP. torch's FSDP2 itself runs on CPU over gloo. The
end-to-end tests therefore start each rank through SHIM, which makes that one decision as accelerate makes it on
GPUs; everything after it (accelerate's `fsdp2_prepare_model`, transformers, TRL, PEFT, the pipeline) is unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.launch.test_distributed import OVERRIDES, ROOT, SCORE, SCORE_OVERRIDES, SCPO, _lora

CONFIG = ROOT / "recipes" / "accelerate" / "fsdp2.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_args(config: Path):
    """`accelerate launch --config_file config` as accelerate parses and checks it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "train", "run", SCPO])
    return _validate_launch_command(args)


def _rank_env(config: Path) -> dict[str, str]:
    """The FSDP_* / ACCELERATE_* variables `accelerate launch --config_file config` gives each rank."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _launch_args(config)
    args.main_process_port = _free_port()
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}


def test_fsdp2_config_as_accelerate_reads_it(monkeypatch):
    from accelerate.commands.launch import launch_command_parser

    raw = yaml.safe_load(CONFIG.read_text())
    args, defaults, _ = _launch_args(CONFIG)
    assert defaults.distributed_type.value == "FSDP" and args.use_fsdp and not args.cpu  # -> multi_gpu_launcher
    assert args.fsdp_version == 2 and args.mixed_precision == "bf16" and not args.use_cpu
    assert args.num_processes == 8 and args.num_machines == 1
    # every fsdp_config key is a real `accelerate launch` option (a typo would be ignored silently)
    assert set(raw["fsdp_config"]) <= {a.dest for a in launch_command_parser()._actions}

    env = _rank_env(CONFIG)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = FullyShardedDataParallelPlugin()  # what Accelerator() builds in each rank from that environment
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.cpu_ram_efficient_loading is False  # else every rank but 0 loads zeros, its HF sampler included
    assert type(plugin.cpu_offload) is OffloadPolicy  # no offload
    assert plugin.activation_checkpointing is False
    import torch

    assert isinstance(plugin.mixed_precision_policy, MixedPrecisionPolicy)
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16


# Each rank: a tiny random Llama (bf16 base, fp32 LoRA: the dtypes of a GPU run) sharded by accelerate's own
# fsdp2_prepare_model with the plugin the shipped config yields, one optimizer step, then the adapter paths of
# train/trainers/adapters.py, train/trainers/score_grpo.py (Stage II) and train/trainers/weighted_dpo.py (iteration 2).
GATHER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.trainers.adapters import adapter_state, gathered, publish_adapter

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(sys.argv[1])
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment of the shipped config
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                  is_main_process=rank == 0, device=torch.device("cpu"), torch_device_mesh=None,
                                  unwrap_model=lambda m: m, wait_for_everyone=dist.barrier)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    def base(seed):
        torch.manual_seed(seed)  # the same base on every rank, as from_pretrained gives
        return LlamaForCausalLM(config).to(torch.bfloat16)

    def whole(model):  # every rank's shard of each trainable tensor, concatenated (Shard(0))
        local = [p.to_local().detach() for _, p in model.named_parameters() if p.requires_grad]
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        return [torch.cat(ts) for ts in zip(*parts)]

    model = fsdp2_prepare_model(accelerator, get_peft_model(base(0), lora))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    row = {
        "class": type(model).__name__,
        "sharded": all(isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0] for _, p in trainable),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    }
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    state = adapter_state(model)  # collective
    row["plain"] = all(type(v) is torch.Tensor and v.device.type == "cpu" for v in state.values())
    row["shapes"] = {n: list(v.shape) for n, v in state.items()}
    row["is_concat_of_shards"] = all(torch.equal(a, b) for a, b in zip(state.values(), whole(model)))
    row["lora_B_max"] = max(float(v.abs().max()) for n, v in state.items() if "lora_B" in n)

    dest = out / "adapter"
    publish_adapter(SimpleNamespace(accelerator=accelerator, model=model), dest)  # rank 0 writes, all wait
    saved = load_file(str(dest / "adapter_model.safetensors"))
    row["saved"] = sorted(saved)
    row["saved_matches"] = all(torch.equal(saved[n.replace(".default", "")], v) for n, v in state.items())

    # score_trainer.build_trainer: Stage I's file into a fresh LoRA, inside `gathered`. TRL shards the model only in
    # train(), after this; the already-sharded case is what a resume does (DPO's _load_from_checkpoint).
    for when in ("before", "after"):
        fresh = get_peft_model(base(0), lora)  # a new LoRA init (lora_A random), not the published one
        if when == "after":
            fresh = fsdp2_prepare_model(accelerator, fresh)
        params = [p for p in fresh.parameters() if p.requires_grad]
        with gathered(params, modifier_rank=0):
            set_peft_model_state_dict(fresh, saved)
        if when == "before":
            fresh = fsdp2_prepare_model(accelerator, fresh)
        row[f"load_{when}_sharding"] = all(torch.equal(a, b) for a, b in zip(adapter_state(fresh).values(),
                                                                          state.values()))
    # dpo.train_dpo, iteration 2: PeftModel.from_pretrained before the trainer exists, then sharded.
    resumed = fsdp2_prepare_model(accelerator, PeftModel.from_pretrained(base(0), str(dest), is_trainable=True))
    row["from_pretrained"] = all(torch.equal(a, b) for a, b in zip(adapter_state(resumed).values(), state.values()))

    (out / f"rank{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_adapter_state_gathers_fsdp2_shards_over_gloo(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    env = os.environ | _rank_env(CONFIG) | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for row in rows:
        assert row["class"] == "FSDPPeftModel" and row["sharded"], "every LoRA tensor a DTensor, half on each rank"
        assert row["dtypes"] == ["torch.bfloat16", "torch.float32"]  # frozen bf16 base, fp32 LoRA, one FSDP unit
        assert row["plain"] and row["is_concat_of_shards"], "whole tensors, not DTensors or one rank's shard"
        assert {tuple(s) for n, s in row["shapes"].items() if "lora_A" in n} == {(4, 64)}
        assert row["lora_B_max"] > 0, "the optimizer step reached the sharded LoRA B"
        assert row["saved_matches"] and len(row["saved"]) == len(row["shapes"]) == 8  # 2 layers x q,v x A,B
        assert row["load_before_sharding"] and row["load_after_sharding"] and row["from_pretrained"]
    assert rows[0] == rows[1], "every rank gathered the same adapter"


# Started by `accelerate launch` in place of `-m train`: on CPU ranks, take accelerate's FSDP branch as it is taken on
# GPUs (state.py:1010-1016 and 1037), then run the CLI unchanged. Any FSDP plugin means the FSDP config was launched.
SHIM = textwrap.dedent(
    """
    import runpy, sys
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later AcceleratorState() copy it

    AcceleratorState.__init__ = __init__
    sys.argv = ["train", *sys.argv[1:]]
    runpy.run_module("train", run_name="__main__", alter_sys=True)
    """
)


def _fsdp2_cpu(tmp_path: Path) -> tuple[Path, Path]:
    """The shipped config fit for 2 CPU ranks (fp32, gloo), and the shim that starts each rank."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg |= {"mixed_precision": "no", "num_processes": 2, "use_cpu": True}
    config, shim = tmp_path / "fsdp2-cpu.yaml", tmp_path / "fsdp2_shim.py"
    config.write_text(yaml.safe_dump(cfg))
    shim.write_text(SHIM)
    return config, shim


def _launch_fsdp2(tmp_path: Path, out: Path, recipe: str, overrides: list[str]) -> subprocess.CompletedProcess:
    config, shim = _fsdp2_cpu(tmp_path)
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(shim), "run", recipe, f"output_dir={out}", *overrides]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-5000:]
    return res


def _top_lora_b(weights: dict) -> float:
    return max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k)


@pytest.mark.slow
@pytest.mark.integration
def test_fsdp2_trains_and_publishes_whole_adapters(tmp_path, smollm2_dir):
    # Two ScPO iterations: the first publishes from a sharded model, the second loads it (PeftModel.from_pretrained,
    # before the trainer shards the model), trains on, and publishes again.
    out = tmp_path / "run"
    res = _launch_fsdp2(tmp_path, out, SCPO, [*OVERRIDES, "iterations=2"])
    assert res.stderr.count("training on 2 processes, FSDP on cpu") == 2
    first, second = _lora(out / "iter_1" / "adapter"), _lora(out / "iter_2" / "adapter")
    r = json.loads((out / "recipe.json").read_text())["lora"]["r"]
    lora_a = [v for k, v in first.items() if "lora_A" in k]
    assert lora_a and all(v.dim() == 2 and v.shape[0] == r for v in lora_a), "gathered, not one rank's rows"
    assert first.keys() == second.keys() and all(first[k].shape == second[k].shape for k in first)
    assert _top_lora_b(first) > 0, "one DPO step moves LoRA B off zero"
    assert _top_lora_b(second) > 1.5 * _top_lora_b(first), "iteration 2 continued iteration 1"
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial")) or p.name == "checkpoints"]


@pytest.mark.slow
@pytest.mark.integration
def test_fsdp2_score_publishes_each_step_and_stage2_starts_from_stage1(tmp_path, tiny_model_dir):
    # SCoRe publishes the rollout adapter inside every training step, from the sharded model, and Stage II loads
    # Stage I's adapter in build_trainer (`gathered(..., modifier_rank=0)`). The tiny random Llama: its rewards are
    # all 0, so Stage II's LoRA A equals Stage I's exactly if it was loaded, and differs by its init if not.
    out = tmp_path / "run"
    res = _launch_fsdp2(tmp_path, out, SCORE, [*SCORE_OVERRIDES, f"model={tiny_model_dir}"])
    assert res.stderr.count("training on 2 processes, FSDP on cpu") == 2  # Stage I and II
    stage1, stage2 = _lora(out / "iter_1" / "adapter"), _lora(out / "iter_2" / "adapter")
    assert stage1.keys() == stage2.keys() and all(stage1[k].shape == stage2[k].shape for k in stage1)
    # A fresh Stage II LoRA (seed + 2) would draw other lora_A values; one step at SCoRe's learning rate barely moves
    # them from Stage I's.
    drift = max(float((stage1[k] - stage2[k]).abs().max()) for k in stage1 if "lora_A" in k)
    assert drift < 1e-3 < min(float(v.abs().max()) for k, v in stage1.items() if "lora_A" in k), drift
    rollouts = [json.loads(x) for x in (out / "iter_2" / "rollouts" / "step_00001.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4, "both ranks rolled out with the adapter rank 0 gathered and published"
    # SHARDED_STATE_DICT checkpoints: each rank's shard of the adapter only (accelerate's adapter_only), not the base.
    ckpt = out / "iter_2" / "checkpoints" / "checkpoint-1" / "pytorch_model_fsdp_0"
    shards = sorted(p.name for p in ckpt.iterdir() if p.suffix == ".distcp")
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    base_bytes = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    assert sum(p.stat().st_size for p in ckpt.iterdir()) < base_bytes / 10, "the base model's weights are not in it"
