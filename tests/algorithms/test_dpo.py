"""Weighted DPO (ScPO): the loss against TRL and by hand, the reference model, and train_dpo end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from train.trainers.weighted_dpo import WeightedDPOTrainer, _rows, train_dpo

PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"What is {i} + {i % 5}?"}],
        "chosen": f"{i} + {i % 5} = {i + i % 5}." + " So the answer is that." * (i % 3),
        "rejected": f"It is {7 * i}.",
        "weight": [1.0, 0.25][i % 2],
    }
    for i in range(8)
]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
LR = 1e-3
FAST = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": LR, "lr_scheduler_type": "constant"}


@pytest.fixture(scope="module")
def init_adapter(tiny_model_dir, tmp_path_factory) -> str:
    """A previous iteration's adapter, far from zero so that it differs clearly from the base model."""
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    out = tmp_path_factory.mktemp("init-adapter")
    model.save_pretrained(out)
    return str(out)


def make_trainer(
    model_dir: str, init_adapter: str, pairs: list[dict], tmp_path, *, beta: float, alpha: float, precompute=False
):
    """The trainer as train_dpo builds it from a previous adapter, with the policy then moved off the reference."""
    config = DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        beta=beta,
        loss_type=["sigmoid", "sft"] if alpha else ["sigmoid"],
        loss_weights=[1.0, alpha] if alpha else None,
        precompute_ref_log_probs=precompute,
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), init_adapter, is_trainable=True)
    trainer = WeightedDPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(_rows(pairs)))
    torch.manual_seed(2)
    with torch.no_grad():  # otherwise policy == reference and every Δ is 0
        for name, p in trainer.model.named_parameters():
            if "lora_B.default" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return trainer


def batch_of(trainer, indices):
    return trainer.data_collator([trainer.train_dataset[i] for i in indices])


def seq_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths, from full logits (not TRL's fused LM head)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    token_logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:]
    return (token_logps * mask).sum(1), mask.sum(1)


def test_unit_weights_equal_trl_sigmoid_loss(tiny_model_dir, init_adapter, tmp_path):
    pairs = [p | {"weight": 1.0} for p in PAIRS]
    trainer = make_trainer(tiny_model_dir, init_adapter, pairs, tmp_path, beta=0.5, alpha=0.0)
    # The weight survives TRL's tokenisation, `remove_unused_columns` and collation into training batches.
    assert "weight" in next(iter(trainer.get_train_dataloader()))
    batch = batch_of(trainer, range(4))
    assert torch.equal(batch["weight"], torch.ones(4))
    unweighted = {k: v for k, v in batch.items() if k != "weight"}
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch))
        trl = DPOTrainer._compute_loss(trainer, trainer.model, dict(unweighted), False)
        no_column = trainer.compute_loss(trainer.model, dict(unweighted))  # no weight: TRL's own code path
    assert abs(trl.item() - math.log(2)) > 1e-3  # Δ != 0, so the comparison means something
    torch.testing.assert_close(ours, trl, rtol=1e-6, atol=1e-7)
    assert torch.equal(no_column, trl)


def test_weighted_loss_matches_hand_computation(tiny_model_dir, init_adapter, tmp_path):
    beta, alpha = 0.5, 0.7
    trainer = make_trainer(tiny_model_dir, init_adapter, PAIRS, tmp_path, beta=beta, alpha=alpha)
    batch = batch_of(trainer, [0, 1])
    w = torch.tensor([1.0, 0.25])
    assert torch.equal(batch["weight"], w)
    loss = trainer.compute_loss(trainer.model, dict(batch))

    policy, lengths = seq_logps(trainer.model, batch)
    ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), init_adapter)
    ref, _ = seq_logps(ref_model, batch)
    (chosen, rejected), (ref_chosen, ref_rejected) = policy.chunk(2), ref.chunk(2)
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    nll_per_token = -chosen / lengths.chunk(2)[0]
    assert lengths[0] != lengths[1]  # per-sequence length normalisation differs from a batch token mean
    expected = -(w * F.logsigmoid(beta * delta)).mean() + alpha * (w * nll_per_token).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    loss.backward()  # gradients reach the trained adapter only, never the frozen reference copy
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".default." in n)
    assert all(g is None for n, g in grads.items() if ".ref." in n)


def test_precomputed_reference_gives_the_same_weighted_loss(tiny_model_dir, init_adapter, tmp_path):
    # train_dpo precomputes the reference log-probs once per iteration (TRL's option): the weighted loss must read
    # them from the batch and equal the loss with a reference forward per batch.
    per_batch = make_trainer(tiny_model_dir, init_adapter, PAIRS, tmp_path / "a", beta=0.5, alpha=0.7)
    once = make_trainer(tiny_model_dir, init_adapter, PAIRS, tmp_path / "b", beta=0.5, alpha=0.7, precompute=True)
    batch = batch_of(once, [0, 1, 2])
    assert {"ref_chosen_logps", "ref_rejected_logps", "weight"} <= set(batch)
    with torch.no_grad():
        expected = per_batch.compute_loss(per_batch.model, dict(batch_of(per_batch, [0, 1, 2])))
        got = once.compute_loss(once.model, dict(batch))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_cpu_scores_only_the_labelled_positions_with_the_same_loss_and_gradients(
    tiny_model_dir, init_adapter, tmp_path, monkeypatch
):
    import trl.kernels.chunked_logprob as trl_kernel
    import trl.trainer.utils as trl_utils

    from train.trainers.trl_config import score_labelled_positions_on_cpu

    trainer = make_trainer(tiny_model_dir, init_adapter, PAIRS, tmp_path, beta=0.5, alpha=0.7)
    batch = batch_of(trainer, [0, 1, 2])
    rows: list[int] = []
    head = trl_utils._ChunkedLogProbFunction

    class Counting:  # TRL's own function, counting the positions it is given
        @staticmethod
        def apply(hidden, *args):
            rows.append(hidden.shape[0])
            return head.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)

    def loss_and_grads():
        trainer.model.zero_grad()
        rows.clear()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, list(rows)

    monkeypatch.setattr(trl_utils, "_use_triton", trl_kernel._use_triton)  # TRL as shipped: every position on CPU
    loss_all, grads_all, rows_all = loss_and_grads()
    score_labelled_positions_on_cpu()
    loss_some, grads_some, rows_some = loss_and_grads()

    positions, labelled = batch["input_ids"][:, 1:].numel(), int(batch["completion_mask"][:, 1:].sum())
    # two scored forwards per loss (policy, then reference): every position before, the labelled ones after
    assert rows_all == [positions] * 2 and rows_some == [labelled] * 2 and labelled < positions / 2
    torch.testing.assert_close(loss_some, loss_all, rtol=1e-6, atol=1e-7)
    assert grads_some.keys() == grads_all.keys() and grads_all
    for name, g in grads_all.items():
        torch.testing.assert_close(grads_some[name], g, rtol=1e-5, atol=1e-7)


def test_dpo_config_precomputes_the_reference_and_autocasts_where_the_cpu_has_bf16(tmp_path, monkeypatch):
    import train.trainers.trl_config as trl_config
    from train.runtime import distributed as dist
    from train.trainers.weighted_dpo import dpo_config

    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(trl_config, "bf16_supported", lambda device: True)
    config = dpo_config(str(tmp_path), beta=0.5, nll_alpha=1.0, trainer_overrides={})
    assert config.precompute_ref_log_probs and config.bf16 and config.use_cpu
    assert config.model_init_kwargs["attn_implementation"] == trl_config.CPU_ATTENTION  # float32 attention
    assert config.model_init_kwargs["dtype"] == "float32", "autocast: the weights stay float32"
    mine = {"model_init_kwargs": {"attn_implementation": "eager"}}  # the recipe's key wins, the others stay
    assert dpo_config(str(tmp_path), beta=0.5, nll_alpha=1.0, trainer_overrides=mine).model_init_kwargs == {
        **config.model_init_kwargs,
        "attn_implementation": "eager",
    }
    assert not dpo_config(str(tmp_path), beta=0.5, nll_alpha=1.0, trainer_overrides={"bf16": False}).bf16
    with monkeypatch.context() as m:  # several ranks: TRL's precompute hands results over through a per-process cache
        m.setattr(dist, "world_size", lambda: 2)
        assert not dpo_config(str(tmp_path), beta=0.5, nll_alpha=1.0, trainer_overrides={}).precompute_ref_log_probs
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # DeepSpeed on CPU keeps float32
    assert not trl_config.cpu_bf16_autocast()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setattr(trl_config, "bf16_supported", lambda device: False)
    assert not dpo_config(str(tmp_path), beta=0.5, nll_alpha=1.0, trainer_overrides={}).bf16


def test_length_grouped_batches_cover_every_row_once_in_a_seeded_order(tiny_model_dir, tmp_path):
    """`train_sampling_strategy: group_by_length` (our DPO default) on TRL's preference rows, which have no
    `input_ids` (transformers' sampler raised for them): each optimizer step's rows sorted longest first, every row
    once per epoch, and each epoch's order from seed + epoch, so a resumed epoch skips the rows it trained."""
    from train.trainers.weighted_dpo import dpo_config

    pairs = [p | {"chosen": p["chosen"] + " More." * (3 * i)} for i, p in enumerate(PAIRS * 2)]  # 16 distinct lengths
    overrides = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "bf16": False}
    config = dpo_config(str(tmp_path), beta=0.5, nll_alpha=1.0, trainer_overrides=overrides, seed=3)
    assert config.train_sampling_strategy == "group_by_length"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = WeightedDPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(_rows(pairs)))

    def epoch_order(epoch: int) -> list[int]:
        loader = trainer.get_train_dataloader()
        loader.set_epoch(epoch)
        lengths = []
        for batch in loader:
            assert "length" not in batch, "the collator drops the sampler's column"
            lengths += batch["attention_mask"].sum(1).chunk(2)[0].tolist()  # the chosen rows: prompt + chosen
        return lengths

    first = epoch_order(0)
    assert sorted(first) == sorted(len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in trainer.train_dataset)
    steps = [first[i : i + 4] for i in range(0, len(first), 4)]  # 2 rows x 2 accumulation steps per optimizer step
    assert all(step == sorted(step, reverse=True) for step in steps), steps
    assert steps != sorted(steps, reverse=True), "steps in random order, not the whole epoch sorted"
    assert epoch_order(0) == first, "the same epoch, the same order (resume)"
    assert epoch_order(1) != first
    random = dpo_config(str(tmp_path), beta=0.5, nll_alpha=1.0, trainer_overrides={"train_sampling_strategy": "random"})
    assert random.train_sampling_strategy == "random"


def test_cpu_autocast_attention_runs_in_float32(tiny_model_dir, monkeypatch):
    # CPU autocast would run SDPA in bf16, whose flash-attention backward is ~3x slower on CPU; ours takes the same
    # bf16 inputs in float32 and returns the query's dtype, and the model trains through it.
    from train.trainers import trl_config

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):  # the dtype SDPA's kernel gets: CPU autocast casts its inputs to bf16
        seen.append(torch.bfloat16 if torch.is_autocast_enabled("cpu") else q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 16, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = trl_config.sdpa_float32(module, q, k, v, mask, scaling=0.25)
    want = sdpa(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.25).transpose(1, 2).to(torch.bfloat16)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    assert torch.equal(out, want)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()

    name = trl_config.register_cpu_attention()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    logits = {}
    for impl in ("sdpa", name):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits[impl] = model(ids).logits.float()
        assert set(seen) == {torch.bfloat16 if impl == "sdpa" else torch.float32}
    torch.testing.assert_close(logits[name], logits["sdpa"], rtol=0.05, atol=0.05)  # the same model, bf16 noise


@pytest.fixture(scope="module")
def from_init(tiny_model_dir, init_adapter, tmp_path_factory):
    """Two steps of train_dpo continuing from `init_adapter` (a LoRA config it must ignore)."""
    out = tmp_path_factory.mktemp("from-init")
    kwargs = dict(init_adapter=init_adapter, lora=LORA | {"r": 8}, beta=0.5, nll_alpha=1.0)
    return out, kwargs, train_dpo(tiny_model_dir, PAIRS, str(out), trainer_overrides=FAST, **kwargs)


def test_train_dpo_fresh_adapter(tiny_model_dir, tmp_path):
    metrics = train_dpo(
        tiny_model_dir,
        PAIRS,
        str(tmp_path),
        init_adapter=None,
        lora=LORA,
        beta=0.1,
        nll_alpha=1.0,
        trainer_overrides=FAST,
    )
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter.tmp").exists()
    json.dumps(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"]) and "rewards/accuracies" in metrics
    assert metrics["rewards/margins_first"] == pytest.approx(0.0, abs=1e-6)  # fresh LoRA: policy = base = reference
    lora_b = [v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # LoRA B starts at zero


def test_train_dpo_continues_from_init_adapter(tiny_model_dir, init_adapter, from_init):
    out, _, metrics = from_init
    # The reference is the starting adapter: the first step's margins are 0 ...
    assert abs(metrics["rewards/margins_first"]) < 1e-5
    # ... whereas against the base model (adapters disabled) any batch of 4 pairs would have a clear mean margin.
    ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), init_adapter)
    trainer = make_trainer(tiny_model_dir, init_adapter, PAIRS, out / "probe", beta=0.5, alpha=0.0)
    batch = batch_of(trainer, range(len(PAIRS)))
    policy, _ = seq_logps(ref_model, batch)
    with ref_model.disable_adapter():
        base, _ = seq_logps(ref_model, batch)
    margins = 0.5 * ((policy - base).chunk(2)[0] - (policy - base).chunk(2)[1])
    assert margins.sort().values[: FAST["per_device_train_batch_size"]].mean() > 0.05

    # The trained adapter started from the init adapter: same config, weights within a few Adam steps of it.
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert not (adapter / "ref").exists()  # TRL's frozen reference copy is not published
    init, trained = (
        load_file(f"{init_adapter}/adapter_model.safetensors"),
        load_file(adapter / "adapter_model.safetensors"),
    )
    assert init.keys() == trained.keys()
    moved = max((trained[k] - init[k]).abs().max().item() for k in init)
    assert 0 < moved <= 2 * FAST["max_steps"] * LR


def test_train_dpo_resumes_from_checkpoint(tiny_model_dir, from_init, tmp_path, monkeypatch):
    out, kwargs, _ = from_init
    # Stand-in for a kill right after checkpoint-1: keep the checkpoints a finished phase would delete.
    monkeypatch.setattr("train.trainers.weighted_dpo.shutil.rmtree", lambda *a, **k: None)
    train_dpo(tiny_model_dir, PAIRS, str(tmp_path), trainer_overrides=FAST | {"max_steps": 1}, **kwargs)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "checkpoint-1").is_dir()
    metrics = train_dpo(tiny_model_dir, PAIRS, str(tmp_path), trainer_overrides=FAST, **kwargs)
    assert metrics["steps"] == 2
    expected, resumed = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, tmp_path))
    for key in expected:  # would fail if the trained adapter were not restored next to TRL's "ref" copy
        torch.testing.assert_close(resumed[key], expected[key])
    assert not (tmp_path / "checkpoints").exists(), "a published adapter makes its checkpoints redundant"


def test_non_finite_loss_names_the_step(tiny_model_dir, tmp_path, monkeypatch):
    nan = lambda self, model, inputs, return_outputs: torch.tensor(float("nan"), requires_grad=True)  # noqa: E731
    monkeypatch.setattr(WeightedDPOTrainer, "_compute_loss", nan)
    with pytest.raises(RuntimeError, match="step 1"):
        train_dpo(
            tiny_model_dir,
            PAIRS,
            str(tmp_path),
            init_adapter=None,
            lora=LORA,
            beta=0.1,
            nll_alpha=0.0,
            trainer_overrides=FAST,
        )


def test_rows_and_empty_pairs(tiny_model_dir, tmp_path):
    rows = _rows([{"prompt": "hi", "chosen": "a", "rejected": "b"}, PAIRS[1]])
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi"}] and rows[0]["weight"] == 1.0
    assert rows[1]["chosen"] == [{"role": "assistant", "content": PAIRS[1]["chosen"]}] and rows[1]["weight"] == 0.25
    assert "weight" not in _rows([{"prompt": "hi", "chosen": "a", "rejected": "b"}])[0]
    with pytest.raises(ValueError, match="finite"):
        _rows([PAIRS[0] | {"weight": float("nan")}])
    with pytest.raises(ValueError, match="no pairs to train on"):
        train_dpo(
            tiny_model_dir,
            [],
            str(tmp_path),
            init_adapter=None,
            lora=LORA,
            beta=0.1,
            nll_alpha=0.0,
            trainer_overrides={},
        )


def test_base_model_without_chat_template_trains(tiny_model_dir, tmp_path):
    """Base models (ScPO's Llama-3 8B) ship no chat template: engines and trainers share a plain one."""
    import json
    import shutil

    from train.engine import render_prompts
    from train.models import PLAIN_CHAT_TEMPLATE, load_tokenizer
    from train.trainers.weighted_dpo import train_dpo

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tok = load_tokenizer(str(base))
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE
    prompt = render_prompts(tok, [[{"role": "user", "content": "What is 2 + 2?"}]])[0]
    assert tok.decode(prompt, skip_special_tokens=True) == "User: What is 2 + 2?\n\nAssistant:"
    pairs = [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}] * 2
    metrics = train_dpo(str(base), pairs, str(tmp_path / "out"), init_adapter=None,
                        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]}, beta=0.1, nll_alpha=0.0,
                        trainer_overrides={"max_steps": 1, "per_device_train_batch_size": 2})  # fmt: skip
    assert metrics["steps"] == 1 and (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
