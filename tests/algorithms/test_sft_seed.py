"""The SFT seed phase of Self-/Meta-Rewarding (M1 = SFT(M0), Self-Rewarding §2.4/§3.1, Meta-Rewarding §3.1) on the
tiny random Llama: it trains, is skipped on rerun, is redone when an `sft.*` key changes, and iteration 1 starts from
its adapter; with `sft.enabled: false` no phase input changes. Config errors name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from train.algorithms.sft_seed import READS, eft_rows, ift_rows, run_sft_seed
from train.config import ConfigError, Recipe, load_recipe
from train.config.preflight import preflight
from train.loop import Run
from train.runtime.artifacts import write_json

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def data(tmp_path) -> dict[str, str]:
    ift = [{"prompt": f"Name a colour number {i}.", "response": f"Colour {i} is blue."} for i in range(4)]
    eft = [
        {"prompt": "What is 2 + 2?", "response": "4", "judgement": "Correct and direct. Score: 5"},
        {"prompt": "What is 2 + 2?", "response": "5", "judgement": "Wrong answer. Score: 1"},
    ]
    return {"ift_file": _jsonl(tmp_path / "ift.jsonl", ift), "eft_file": _jsonl(tmp_path / "eft.jsonl", eft)}


def _recipe(tmp_path: Path, data: dict[str, str], **sft) -> Recipe:
    return Recipe.model_validate({
        "algorithm": "self_rewarding", "output_dir": str(tmp_path / "out"), "lora": LORA, "eval": {"enabled": False},
        # The DPO iterations' keys; the SFT phase reads none of them but bf16 (sft_seed.READS).
        "trainer": {"bf16": False, "max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-9},
        "sft": {"enabled": True, **data, "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                "max_length": 128} | sft,
    })  # fmt: skip


def _lora_b(adapter: Path) -> dict:
    return {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k}


@pytest.mark.slow  # three pipeline runs (~20 s)
def test_sft_trains_skips_redoes_and_iteration_1_starts_from_it(tmp_path, data, tiny_model_dir):
    run = Run(_recipe(tmp_path, data), model_path=tiny_model_dir)
    metrics = run_sft_seed(run)
    adapter = run.iter_dir(0) / "adapter"
    assert metrics["steps"] == 2 and metrics["ift_examples"] == 4 and metrics["eft_examples"] == 2
    trained = _lora_b(adapter)
    assert trained and all(v.abs().max() > 0 for v in trained.values()), "LoRA B starts at zero: training moved it"
    assert not (run.iter_dir(0) / "checkpoints").exists()

    # Iteration 1 starts from it: sampling and the DPO start and reference read Run.adapter(0), and every phase that
    # declares `adapter=0` depends on the `sft` phase.
    assert run.adapter(0) == adapter
    probe = run.iter_dir(1) / "probe.json"
    calls = []

    def iteration_1_phase(r: Run) -> None:
        r.phase(1, "probe", probe, lambda: calls.append(1) or write_json(probe, {}) or {}, adapter=0)

    iteration_1_phase(run)

    stamp = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    rerun = Run(_recipe(tmp_path, data), model_path=tiny_model_dir)
    assert run_sft_seed(rerun) == metrics  # recorded metrics, nothing trained
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    iteration_1_phase(rerun)
    assert len(calls) == 1, "unchanged inputs: iteration 1's phase is skipped too"

    edited = Run(_recipe(tmp_path, data, learning_rate=2e-2), model_path=tiny_model_dir)
    run_sft_seed(edited)
    assert "iter_0/sft" in edited._ran, "an `sft.*` edit redoes the phase"
    assert any((a - trained[k]).abs().max() > 0 for k, a in _lora_b(adapter).items())
    iteration_1_phase(edited)
    assert len(calls) == 2, "and what starts from its adapter"

    # Iteration 1's DPO continues the SFT adapter (also its reference): at a negligible learning rate its adapter
    # stays where it started, the SFT weights, where a fresh LoRA would have B = 0.
    from train.algorithms.dpo_iteration import train_dpo_iteration

    sft = _lora_b(adapter)
    pairs = [{"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "Go away."}] * 2
    train_dpo_iteration(edited, 1, pairs, beta=0.1, nll_alpha=0.0)
    after = _lora_b(edited.iter_dir(1) / "adapter")
    assert after.keys() == sft.keys() and all((after[k] - sft[k]).abs().max() < 1e-5 for k in sft)


def test_without_sft_nothing_changes(tmp_path, data):
    recipe = _recipe(tmp_path, data, enabled=False)
    run = Run(recipe, model_path="unused")
    (run.iter_dir(0) / "adapter").mkdir(parents=True)  # left over from an earlier run with SFT on
    assert run_sft_seed(run) is None and run.adapter(0) is None
    assert run._inputs(1, ("seed",), ("generate",), 0, None) == run._inputs(1, ("seed",), ("generate",), None, None)


def test_rows_are_prompted_as_the_actor_and_the_judge(tmp_path, data):
    recipe = _recipe(tmp_path, data)
    recipe.data.system_prompt = "Be brief."
    ift, eft = ift_rows(recipe), eft_rows(recipe)
    assert ift[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Name a colour number 0."}]  # fmt: skip
    assert ift[0]["completion"] == [{"role": "assistant", "content": "Colour 0 is blue."}]
    assert "What is 2 + 2?" in eft[0]["prompt"][0]["content"] and "Score" in eft[0]["prompt"][0]["content"]
    assert eft[1]["completion"][0]["content"] == "Wrong answer. Score: 1"
    assert {"data.instruction", "data.system_prompt", "sft", "lora", "trainer.bf16"} <= set(READS)
    assert "trainer" not in READS, "the DPO iterations' trainer keys must not redo the SFT"


def _refused(tmp_path: Path, text: str, overrides: list[str], needle: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        preflight(load_recipe(p, overrides), output_dir=False)
    assert needle in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_config_errors_name_the_key(tmp_path, data):
    base = "algorithm: meta_rewarding\noutput_dir: out\nmodel: smollm2-135m-instruct\n"
    _refused(tmp_path, base, ["sft.enabled=true"], "sft.enabled needs sft.ift_file or sft.eft_file")
    _refused(tmp_path, base, ["sft.enabled=true", "sft.ift_file=nope.jsonl"], "sft.ift_file: SFT data file not found")
    _jsonl(tmp_path / "bad_eft.jsonl", [{"prompt": "q", "response": "r", "judgement": "fine, I guess"}])
    bad = str(tmp_path / "bad_eft.jsonl")
    _refused(tmp_path, base, ["sft.enabled=true", f"sft.eft_file={bad}"], f"sft.eft_file: {bad}:1: `judgement`")
    _jsonl(tmp_path / "no_response.jsonl", [{"prompt": "q"}])
    no_resp = str(tmp_path / "no_response.jsonl")
    _refused(tmp_path, base, ["sft.enabled=true", f"sft.ift_file={no_resp}"], "sft.ift_file: ")
    scpo = "algorithm: scpo\noutput_dir: out\n"
    _refused(
        tmp_path, scpo, ["sft.enabled=true", f"sft.ift_file={data['ift_file']}"], "sft.enabled: the SFT seed phase"
    )
    # Relative paths in a recipe file resolve against its folder, like data.train_file.
    p = tmp_path / "ok.yaml"
    p.write_text(base + "sft: {enabled: true, eft_file: eft.jsonl}\n")
    assert load_recipe(p).sft.eft_file == data["eft_file"]
