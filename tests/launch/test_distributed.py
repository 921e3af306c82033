"""`accelerate launch` with 2 CPU processes (gloo): sharded sampling, rank-0 artifacts, DDP training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require, require_tool

ROOT = Path(__file__).resolve().parents[2]
SCPO = "recipes/scpo/smollm2-135m-cpu.yaml"
SCORE = "recipes/score/smollm2-135m-cpu.yaml"
OVERRIDES = [
    "iterations=1",
    "max_prompts=6",
    "eval.enabled=false",
    "sampling.engine=hf",  # two vLLM-CPU engines would fight over 2 cores; the sharding logic is the same
    "sampling.max_tokens=16",
    "scpo.num_samples=4",
    "scpo.vote_threshold=[0.25]",
    "trainer.max_steps=1",
    "trainer.per_device_train_batch_size=1",
    "trainer.gradient_accumulation_steps=1",
]
SCORE_OVERRIDES = [
    "max_prompts=4",
    "data.num_eval=3",  # uneven shards: 2 + 1
    "eval.num_samples=1",
    "sampling.engine=hf",
    "sampling.max_tokens=16",
    "score.stage1_steps=1",
    "score.stage2_steps=1",
    "trainer.per_device_train_batch_size=2",  # one group of num_generations=2 rollouts per rank and step
    "trainer.gradient_accumulation_steps=1",
]


# What the tiny random Llama needs to give ScPO pairs: its answers are random text, so the normalised last line is the
# answer, and with τ = 0 and no margin its 1-1 ties become pairs (weight 0: the DPO step runs but moves nothing).
TINY_SCPO = ["data.answer_type=exact", "scpo.vote_threshold=[0.0]", "scpo.min_vote_margin=0"]


def _launch(
    out: Path,
    processes: int,
    recipe: str = SCPO,
    overrides: list[str] = OVERRIDES,
    config: str | Path = "recipes/accelerate/cpu.yaml",
) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if Path(config).name == "cpu.yaml":
        env["ACCELERATE_USE_CPU"] = "true"  # plain DDP over gloo; it would also switch DeepSpeed off
    run = ["-m", "train", "run", recipe, f"output_dir={out}", *overrides]
    if processes > 1:
        launch = ["-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(processes)]
        cmd = [sys.executable, *launch, *run]
    else:
        cmd = [sys.executable, *run]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-5000:]
    return res


def _lora(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "wandb" not in p.parts}


@pytest.mark.slow
@pytest.mark.integration
def test_two_process_iteration_matches_single_process_shape(tmp_path, tiny_model_dir):
    # Sharding and publishing, not learning: the tiny random Llama runs the same code as SmolLM2 in a fraction of
    # the time.
    single, multi = tmp_path / "single", tmp_path / "multi"
    tiny = [*OVERRIDES, f"model={tiny_model_dir}", *TINY_SCPO]
    _launch(single, 1, overrides=tiny)
    res = _launch(multi, 2, overrides=tiny)
    assert _files(multi) == _files(single), "same artifacts, no per-rank leftovers"
    rows = [json.loads(x) for x in (multi / "iter_1" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 4
    assert [r["prompt_id"] for r in rows[::4]] == [
        json.loads(x)["prompt_id"] for x in (single / "iter_1" / "samples.jsonl").read_text().splitlines()
    ][::4]
    assert sorted(os.listdir(multi / "iter_1" / "adapter")) == sorted(os.listdir(single / "iter_1" / "adapter"))
    assert res.stderr.count("iter 1: train took") == 1, "only rank 0 reports and publishes"
    metrics = [json.loads(x) for x in (multi / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1] and metrics[0]["generate/samples"] == 24


@pytest.mark.slow
@pytest.mark.integration
def test_map_sharded_keeps_order_across_ranks(tmp_path):
    # What Meta-Rewarding's generate / judge / meta-judge phases rely on: each rank maps its shard, every
    # rank gets all results in item order. 7 items over 2 ranks: uneven shards.
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, sys\n"
        "from train.runtime import distributed as dist\n"
        "from train.engine import GenParams, ShardedSampler, generate_together\n"
        "out = dist.map_sharded(lambda xs: [(x, dist.rank()) for x in xs], list(range(7)))\n"
        "class Inner:\n"
        "    tokenizer = None\n"
        "    def generate_ids_together(self, batches, desc=''):\n"
        "        return [[(ids[0], p.n, dist.rank()) for ids in part] for part, p in batches]\n"
        "batches = [([[i] for i in range(5)], GenParams(n=1)), ([[10 + i] for i in range(4)], GenParams(n=3))]\n"
        "together = generate_together(ShardedSampler(Inner()), batches)\n"
        "open(sys.argv[1] + f'/rank{dist.rank()}.json', 'w').write(json.dumps([out, together]))\n"
        "dist.shutdown()\n"  # as `selfreward run` does
    )
    env = os.environ | {"PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu.yaml",
           "--num_processes", "2", str(script), str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    want = [[x, x % 2] for x in range(7)]  # item x was mapped by rank x % 2
    # the eval's greedy and sampled batches in one call: shards of the 9 prompts of both, each back in its batch
    together = [[[i, 1, i % 2] for i in range(5)], [[10 + i, 3, (5 + i) % 2] for i in range(4)]]
    assert json.loads((tmp_path / "rank0.json").read_text()) == [want, together]
    assert json.loads((tmp_path / "rank1.json").read_text()) == [want, together]


@pytest.mark.slow
@pytest.mark.integration
def test_score_two_processes_roll_out_their_shards_and_publish_once(tmp_path, tiny_model_dir):
    # Rollout sharding, publishing and sharded eval on the tiny random Llama (its rewards are all 0: nothing here
    # asserts learning).
    single, multi = tmp_path / "single", tmp_path / "multi"
    overrides = [*SCORE_OVERRIDES, f"model={tiny_model_dir}"]
    alone = _launch(single, 1, SCORE, overrides)
    assert alone.stderr.count("training on 1 process on cpu") == 2
    res = _launch(multi, 2, SCORE, overrides)
    # TRL's mid-stage checkpoints hold one RNG state per rank; everything else is written once.
    published = lambda out: {f for f in _files(out) if "/checkpoints/" not in f}  # noqa: E731
    assert published(multi) == published(single), "same artifacts, no per-rank rollout adapters or rollout files"
    assert (multi / "iter_2" / "checkpoints" / "checkpoint-1" / "rng_state_1.pth").is_file()
    assert res.stderr.count("training on 2 processes, MULTI_CPU on cpu") == 2  # Stage I and II, logged by rank 0
    for stage in (1, 2):
        rows = [
            json.loads(x) for x in (multi / f"iter_{stage}" / "rollouts" / "step_00001.jsonl").read_text().splitlines()
        ]
        # Both ranks' rollouts in one file: 2 ranks x 2 per device, each rank one prompt's group of 2.
        assert len(rows) == 4 and all(r["stage"] == stage and r["step"] == 1 for r in rows)
        assert rows[0]["prompt_id"] == rows[1]["prompt_id"] and rows[2]["prompt_id"] == rows[3]["prompt_id"]
        assert rows[0]["prompt_id"] != rows[2]["prompt_id"], "each rank rolled out its own prompt"
    for k in range(3):  # evaluation sharded over both ranks: every prompt, and the KL over both shards
        one, two = (json.loads((out / f"iter_{k}" / "eval.json").read_text()) for out in (single, multi))
        assert (
            two["n"] == one["n"] == 3
            and len((multi / f"iter_{k}" / "eval_rollouts.jsonl").read_text().splitlines()) == 3
        )
        assert two["kl_t1"] >= 0 and two["kl_t2"] >= 0 and (k > 0 or two["kl_t1"] == 0.0)
    stage1, stage2 = _lora(multi / "iter_1" / "adapter"), _lora(multi / "iter_2" / "adapter")
    assert stage1.keys() == stage2.keys() and all(stage1[k].shape == stage2[k].shape for k in stage1)


def _zero3_config(dest: Path) -> Path:
    """The shipped ZeRO-3 config, fit for CPU: fp32 (no bf16 on this CPU path) and 2 processes."""
    import yaml

    cfg = yaml.safe_load((ROOT / "recipes/accelerate/zero3.yaml").read_text())
    cfg |= {"mixed_precision": "no", "num_processes": 2}
    dest.write_text(yaml.safe_dump(cfg))
    return dest


@pytest.mark.slow
@pytest.mark.integration
def test_zero3_trains_and_publishes_whole_adapters(tmp_path, smollm2_dir):
    # DeepSpeed on CPU: gloo plus a shared-memory comm op it JIT-builds with the system compiler. Two iterations:
    # the second starts from the first's adapter, which ZeRO-3 must load into sharded parameters.
    # ZeRO-2 runs no code of ours that ZeRO-3 and DDP do not: its parameters are whole on every rank, so publishing
    # and loading take the unsharded path (train/trainers/adapters.py gathers only under ZeRO-3). Its config is
    # checked by DeepSpeed's own parser in tests/launch/test_launch.py::test_deepspeed_parses_zero_configs.
    require("deepspeed")
    require_tool("c++", "g++")  # torch's extension builder compiles DeepSpeed's comm op with it
    out = tmp_path / "run"
    config = _zero3_config(tmp_path / "zero3.yaml")
    res = _launch(out, 2, SCPO, [*OVERRIDES, "iterations=2"], config)
    assert res.stderr.count("training on 2 processes, DEEPSPEED ZeRO-3 on cpu") == 2
    first, second = _lora(out / "iter_1" / "adapter"), _lora(out / "iter_2" / "adapter")
    r = json.loads((out / "recipe.json").read_text())["lora"]["r"]
    lora_a = [v for k, v in first.items() if "lora_A" in k]
    assert lora_a and all(v.dim() == 2 and v.shape[0] == r and v.numel() > 0 for v in lora_a), "gathered, not shards"
    assert first.keys() == second.keys() and all(first[k].shape == second[k].shape for k in first)
    top = {
        name: max(float(v.abs().max()) for k, v in w.items() if "lora_B" in k)
        for name, w in (("1", first), ("2", second))
    }
    assert top["1"] > 0, "one DPO step moves LoRA B off zero"
    # Adam's first step moves each weight by about the learning rate: iteration 2 continued iteration 1 rather
    # than restarting from zero.
    assert top["2"] > 1.5 * top["1"], top
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial")) or p.name == "checkpoints"]


@pytest.mark.slow
@pytest.mark.integration
def test_two_process_vllm_run_with_evaluation_on_every_rank(tmp_path, tiny_model_dir):
    # The real vLLM-CPU engine under the external launcher, as on GPUs: building it is collective (vLLM joins the
    # launcher's gloo group), so a rank-0-only phase that built it would hang the job. Before, CPU ranks built
    # private engines and every eval ran on rank 0 alone; a GPU job hung at its first eval.
    out = tmp_path / "run"
    overrides = ["iterations=2", "max_prompts=8", "data.num_eval=6", "scpo.num_samples=4", "eval.num_samples=2",
                 "sampling.max_tokens=16", "trainer.max_steps=1", f"model={tiny_model_dir}", *TINY_SCPO]  # fmt: skip
    res = _launch(out, 2, SCPO, overrides)
    assert res.stderr.count("vLLM engine ready on each of 2 processes (external launcher)") == 1
    for k in range(3):
        ev = json.loads((out / f"iter_{k}" / "eval.json").read_text())
        assert ev["n"] == 6 and 0.0 <= ev["accuracy"] <= 1.0, ev  # both shards gathered: 3 prompts per rank
    assert (out / "iter_2" / "adapter" / "adapter_model.safetensors").is_file()
    assert res.stderr.count("iter 2: eval took") == 1 and res.stdout.count("Held-out evaluation") == 1


CHUNK_PROBE = """
import json, sys
from pathlib import Path
from train.runtime import distributed as dist
from train.runtime.artifacts import ChunkLog, map_chunked
out, units = Path(sys.argv[1]), [f"p{i}" for i in range(13)]
log = ChunkLog(out / "s.jsonl", lambda r: r["prompt_id"], need=2, shard=dist.rank(), num_shards=dist.world_size())
calls = []
def work(chunk):
    calls.append(len(chunk))
    return [{"prompt_id": p, "sample": j, "by": f"{dist.rank()}/{dist.world_size()}"} for p in chunk for j in range(2)], None
map_chunked(log, units, str, 2, work)
if dist.is_main():
    done, _ = log.collect()
    log.finish([r for u in units for r in done[u]])
(out / f"calls{dist.rank()}.json").write_text(json.dumps(calls))
dist.shutdown()
"""


@pytest.mark.slow
@pytest.mark.integration
def test_chunked_work_resumes_across_rank_counts(tmp_path):
    """Partial work (ChunkLog + map_chunked) made by 1 process, then 2 ranks, then 1, each killed (SIGKILL) halfway
    through a chunk append, is finished by 2 ranks: every unit published once, none redone, and the ranks call
    `work` in lockstep although rank 1 has fewer chunks left than rank 0."""
    from train.runtime.artifacts import ChunkLog

    script = tmp_path / "probe.py"
    script.write_text(CHUNK_PROBE)
    units = [f"p{i}" for i in range(13)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def launch(processes: int, fault: str | None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(script), str(tmp_path)]
        if processes > 1:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu.yaml",
                   "--num_processes", str(processes), *cmd[1:]]  # fmt: skip
        extra = {"SELFREWARD_FAULT": fault} if fault else {}
        return subprocess.run(cmd, cwd=ROOT, env=env | extra, capture_output=True, text=True, timeout=600)

    def done() -> set[str]:
        return ChunkLog(tmp_path / "s.jsonl", lambda r: r["prompt_id"], need=2, shard=99).done  # shard 99: reads only

    progress = []
    for processes in (1, 2, 1):
        res = launch(processes, "chunk_append@2")
        assert res.returncode != 0 and not (tmp_path / "s.jsonl").exists(), res.stderr[-3000:]
        progress.append(done())
        assert len(progress) == 1 or progress[-1] > progress[-2], "every run finished a chunk before its kill"
    left = [u for u in units if u not in progress[-1]]
    shards = [[u for i, u in enumerate(units) if i % 2 == r and u in left] for r in (0, 1)]  # what each rank has left
    rounds = max(-(-len(s) // 2) for s in shards)
    want = [[len(s[i * 2 : i * 2 + 2]) for i in range(rounds)] for s in shards]
    res = launch(2, None)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [json.loads((tmp_path / f"calls{r}.json").read_text()) for r in (0, 1)] == want
    assert want[0] != want[1] and 0 in want[1], f"the test wants uneven shards: {want}"
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(u, j) for u in units for j in range(2)]
    assert {r["by"] for r in rows} == {"0/1", "0/2", "1/2"}
    assert not list(tmp_path.glob("*.partial"))
