"""What a real multi-GPU job would hit, checked on CPU by emulating the one thing that cannot run here: the GPU.

Each test names what it emulates. The trainers, PEFT adapters and TRL code paths are the real ones.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [{"prompt": f"What is {a} + 1?", "chosen": str(a + 1), "rejected": str(a + 2), "weight": 0.5} for a in range(4)]
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


class _Loaded(Exception):
    """Raised by the recording `from_pretrained`: the kwargs are what the test needs, not a model on a GPU."""


def _emulate_device(monkeypatch, device: torch.device) -> None:
    from accelerate import PartialState

    PartialState(cpu=True)  # the process's singleton; its state is shared by every instance
    monkeypatch.setitem(PartialState._shared_state, "device", device)


@pytest.fixture
def on_gpu(monkeypatch):
    """Call it to emulate a process of a GPU launch from then on: accelerate reports cuda:1 as this process's device
    and the GPU does bf16; `from_pretrained` records its kwargs and stops (no model can be put on a GPU here).
    Returns the recorded kwargs."""
    import transformers
    import trl

    seen: list[dict] = []

    def record(cls, model_id, *args, **kwargs):
        seen.append(kwargs)
        raise _Loaded

    def start() -> list[dict]:
        # TrainingArguments resets the state to CPU (use_cpu): emulate the GPU again once a config exists.
        for cls in (trl.DPOConfig, trl.GRPOConfig):

            def post_init(self, _orig=cls.__post_init__):
                _orig(self)
                _emulate_device(monkeypatch, torch.device("cuda", 1))

            monkeypatch.setattr(cls, "__post_init__", post_init)
        _emulate_device(monkeypatch, torch.device("cuda", 1))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", classmethod(record))
        return seen

    return start


@pytest.fixture(scope="module")
def iter1_adapter(tiny_model_dir, tmp_path_factory) -> str:
    """A real LoRA adapter on disk, as iteration 1 publishes it."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from train.models import lora_config

    out = tmp_path_factory.mktemp("iter1") / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(LORA))
    model.save_pretrained(str(out))
    return str(out)


def _assert_placed_on_this_gpu(kwargs: dict) -> None:
    # TRL's create_model_from_path defaults to device_map="auto" off CPU (ZeRO-3 refuses it; under DDP each rank
    # spreads over every GPU) and to float32 (32 GB for an 8B model).
    assert kwargs["device_map"] == {"": "cuda:1"}, kwargs
    assert kwargs["dtype"] in (torch.bfloat16, "bfloat16"), kwargs
    assert kwargs["use_safetensors"] is True


@pytest.mark.parametrize("iteration", [1, 2])
def test_dpo_loads_the_base_in_bf16_on_this_processes_gpu(tiny_model_dir, tmp_path, on_gpu, iter1_adapter, iteration):
    from train.trainers.weighted_dpo import train_dpo

    seen = on_gpu()
    with pytest.raises(_Loaded):
        train_dpo(
            tiny_model_dir,
            PAIRS,
            str(tmp_path),
            init_adapter=iter1_adapter if iteration == 2 else None,
            lora=LORA,
            beta=0.1,
            nll_alpha=1.0,
            trainer_overrides={"max_steps": 1},
        )
    assert len(seen) == 1
    _assert_placed_on_this_gpu(seen[0])


def test_score_loads_the_base_like_dpo(tiny_model_dir, tmp_path, on_gpu):
    from tests.algorithms.test_score import _trainer_args
    from train.trainers.score_grpo import build_trainer

    args = _trainer_args(tiny_model_dir, tmp_path)  # its HF sampler loads before the GPU is emulated
    seen = on_gpu()
    with pytest.raises(_Loaded):
        build_trainer(**args)
    _assert_placed_on_this_gpu(seen[-1])


def test_model_kwargs_respect_sharded_launches_and_explicit_dtypes(monkeypatch):
    import train.models as models

    _emulate_device(monkeypatch, torch.device("cuda", 3))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.trainer_model_kwargs("auto")["dtype"] == "float32", "no bf16 on this GPU"
    assert models.trainer_model_kwargs("float16") == {"dtype": "float16", "device_map": {"": "cuda:3"},
                                                      "use_safetensors": True}  # fmt: skip
    monkeypatch.setattr("transformers.integrations.deepspeed.is_deepspeed_zero3_enabled", lambda: True)
    assert models.trainer_model_kwargs("auto")["device_map"] is None, "ZeRO-3 places the shards itself"


def test_score_engine_sleeps_before_reference_logprobs(tiny_model_dir, tmp_path):
    """Emulates vLLM's sleep mode (a GPU feature): the sampler records when it sleeps and wakes."""
    from tests.algorithms.test_score import _trainer_args
    from train.engine import HFSampler
    from train.trainers.score_grpo import build_trainer

    events: list[str] = []

    class Recording(HFSampler):
        def sleep(self):
            events.append("sleep")

        def wake(self):
            events.append("wake")

        def generate_ids(self, *args, **kwargs):
            events.append("generate")
            return super().generate_ids(*args, **kwargs)

    args = _trainer_args(tiny_model_dir, tmp_path)
    args["sampler"].__class__ = Recording
    trainer = build_trainer(**args)
    reference = trainer._reference_logps
    trainer._reference_logps = lambda out: (events.append("reference"), reference(out))[1]
    trainer.train()
    assert "reference" in events
    first_ref = events.index("reference")
    assert "sleep" in events[:first_ref] and events[:first_ref].index("sleep") > events.index("generate"), events


def test_engine_wakes_after_the_finished_trainer_is_freed(tiny_model_dir, tmp_path, monkeypatch):
    """Emulates a sleeping vLLM GPU engine (`_asleep`, `wake_up`) and the CUDA caching allocator (`empty_cache`): the
    engine may wake only once no trainer is alive and PyTorch's cached blocks went back to the device."""
    from train.engine import VLLMSampler
    from train.trainers.weighted_dpo import WeightedDPOTrainer, train_dpo

    train_dpo(tiny_model_dir, PAIRS, str(tmp_path), init_adapter=None, lora=LORA, beta=0.1, nll_alpha=1.0,
              trainer_overrides={"max_steps": 1, "per_device_train_batch_size": 2})  # fmt: skip
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))

    class Engine:
        def wake_up(self):
            alive = sum(isinstance(o, WeightedDPOTrainer) for o in gc.get_objects())
            events.append(f"wake_up with {alive} trainers alive")

    sampler = object.__new__(VLLMSampler)
    sampler.llm, sampler._asleep = Engine(), True
    sampler.wake()
    assert events == ["empty_cache", "wake_up with 0 trainers alive"]


def test_tensor_parallel_with_several_processes_is_refused(tmp_path, cli, monkeypatch):
    # WORLD_SIZE=2 is what accelerate launch sets; the check runs before any process group exists (so in process).
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli("run", "recipes/scpo/smollm2-135m-cpu.yaml", f"output_dir={tmp_path / 'o'}",
                       "sampling.tensor_parallel_size=2")  # fmt: skip
    assert code == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("selfreward: error: sampling.tensor_parallel_size=2 with 2")
    assert "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_collective_timeout_is_the_recipes(tmp_path):
    """2 gloo ranks: rank 0 works alone for 6 s while rank 1 waits in a barrier. With the recipe's 2 s timeout the
    barrier fails; with the default (3 h) it waits. Before, the timeout never reached the group."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, time\n"
        "from train.runtime import distributed as dist\n"
        "from train.config import load_recipe\n"
        "r = load_recipe('recipes/scpo/smollm2-135m-cpu.yaml', sys.argv[2:])\n"
        "dist.configure(r.distributed_timeout_s)\n"
        "if dist.rank() == 0:\n"
        "    time.sleep(6)\n"
        "try:\n"
        "    dist.barrier(); print(f'rank {dist.rank()} passed', flush=True)\n"
        "except Exception as e:\n"
        "    print(f'rank {dist.rank()} timed out: {type(e).__name__}', flush=True)\n"
        "import os; os._exit(0)\n"  # a timed-out gloo group cannot be torn down cleanly
    )
    env = os.environ | {"PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def launch(*overrides: str) -> str:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu.yaml",
               "--num_processes", "2", str(script), "x", *overrides]  # fmt: skip
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        return res.stdout

    assert "rank 1 timed out" in launch("distributed_timeout_s=2")
    assert "rank 1 passed" in launch()


def test_gpu_recipes_launch_ddp_and_bound_their_work():
    from train.config import load_recipe

    gpu = [
        p for p in sorted(ROOT.glob("recipes/*/*.yaml")) if "smollm2" not in p.name and p.parent.name != "accelerate"
    ]
    assert len(gpu) >= 5
    for path in gpu:
        recipe, header = load_recipe(path), path.read_text().split("\nalgorithm:")[0]
        # bf16 8B + LoRA fits one GPU: plain DDP, not ZeRO-3's per-layer all-gathers.
        assert "zero3.yaml" not in header, path
        assert recipe.sampling.max_num_batched_tokens is not None, path
        if recipe.data.hub_id == "OpenAssistant/oasst1":  # first-turn user prompts only, sized for days
            assert recipe.data.hub_filter == {"role": "prompter", "parent_id": None, "lang": "en"}, path
            assert recipe.max_prompts and recipe.max_prompts <= 10_000, path


def test_hub_filter_keeps_matching_rows_with_their_split_index():
    from train.config import ConfigError
    from train.data import keep_matching

    rows = [{"role": "prompter", "parent_id": None, "text": "a"}, {"role": "assistant", "parent_id": "x", "text": "b"},
            {"role": "prompter", "parent_id": "y", "text": "c"}, {"role": "prompter", "parent_id": None, "text": "d"}]  # fmt: skip
    kept = keep_matching(rows, {"role": "prompter", "parent_id": None}, ["role", "parent_id", "text"])
    assert [(i, r["text"]) for i, r in kept] == [(0, "a"), (3, "d")]
    with pytest.raises(ConfigError, match="data.hub_filter: `lang` is not a column"):
        keep_matching(rows, {"lang": "en"}, ["role", "parent_id", "text"])


def test_model_kwargs_leave_fsdp_placement_to_fsdp(monkeypatch):
    # accelerate's launcher sets ACCELERATE_USE_FSDP; PartialState only learns FSDP once a trainer exists.
    import train.models as models

    _emulate_device(monkeypatch, torch.device("cuda", 2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert models.trainer_model_kwargs("bfloat16")["device_map"] is None
