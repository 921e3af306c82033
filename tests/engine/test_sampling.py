"""Both sampler engines on the tiny model, and LoRA hot-swap through a new LoRARequest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import require
from train.config import SamplingConfig
from train.engine import GenParams, HFSampler, generate_together, render_prompts

CONVS = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Name a color."}]]


def _random_adapter(
    model_dir: str, out: str, seed: int, targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")
) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=8, lora_alpha=64, target_modules=list(targets), init_lora_weights=False)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    peft.save_pretrained(out)
    return out


def test_render_prompts_uses_chat_template(tiny_model_dir):
    from train.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ids = render_prompts(tok, CONVS[:1])[0]
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "What is 2 + 3?" in text


def test_hf_engine_shapes_and_adapter_swap(tiny_model_dir, tmp_path):
    s = HFSampler(tiny_model_dir, SamplingConfig(engine="hf", batch_size=2), seed=0)
    out = s.generate(CONVS, GenParams(n=3, temperature=1.0, max_tokens=8))
    assert [len(o) for o in out] == [3, 3]
    assert all(len(x.token_ids) <= 8 and x.finish_reason in ("stop", "length") for o in out for x in o)
    greedy = lambda: [o[0].token_ids for o in s.generate(CONVS, GenParams(n=1, temperature=0.0, max_tokens=8))]  # noqa: E731
    base = greedy()
    assert greedy() == base, "greedy decoding is deterministic"
    s.set_adapter(_random_adapter(tiny_model_dir, str(tmp_path / "a1"), 1))
    swapped = greedy()
    assert swapped != base
    s.set_adapter(None)
    assert greedy() == base, "removing the adapter restores the base model"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("lora_sync", ["merge", "adapter"])
def test_vllm_engine_hot_swaps_adapters(tiny_model_dir, tmp_path, lora_sync):
    require("vllm")
    import psutil
    from safetensors.torch import load_file, save_file

    from train.engine import VLLMSampler

    # float32 on both engines: the claim is that they agree token for token (bf16 is the CPU default where native)
    cfg = SamplingConfig(max_model_len=256, kv_cache_gib=0.25, dtype="float32", lora_sync=lora_sync)
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    s = VLLMSampler(tiny_model_dir, cfg, lora_rank=8, seed=0)
    # on CPU the engine runs in this process (no engine-core or worker process to spawn, import and pin to a core)
    spawned = [c.name() for c in psutil.Process().children(recursive=True) if c.pid not in before]
    assert not spawned and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0", spawned
    from vllm.v1.sample.ops import topk_topp_sampler

    from train.engine import vllm_cpu_sampler

    assert topk_topp_sampler.apply_top_k_top_p is vllm_cpu_sampler.apply_top_k_top_p, "our plugin loaded in-process"
    greedy = GenParams(n=1, temperature=0.0, max_tokens=8)
    base = [o[0].token_ids for o in s.generate(CONVS, greedy)]
    out = s.generate(CONVS, GenParams(n=4, temperature=1.0, max_tokens=8))
    assert [len(o) for o in out] == [4, 4] and all(x.finish_reason in ("stop", "length") for o in out for x in o)
    # a prompt longer than max_model_len gets empty samples instead of failing the batch it is in
    ids = render_prompts(s.tokenizer, CONVS)
    long_and_short = s.generate_ids([ids[0] * 40, ids[1]], greedy)
    assert len(ids[0] * 40) > 256 and [(x.text, x.token_ids, x.finish_reason) for x in long_and_short[0]] == [
        ("", [], "length")
    ]
    assert long_and_short[1][0].token_ids == base[1]
    # greedy and sampled batches in one engine call (the eval): each keeps its own params, an over-long prompt too
    greedy_again, sampled = generate_together(
        s, [([ids[0] * 40, *ids], greedy), (ids, GenParams(n=3, temperature=1.0, max_tokens=8))]
    )
    assert [o[0].token_ids for o in greedy_again[1:]] == base and greedy_again[0][0].token_ids == []
    assert [len(o) for o in sampled] == [3, 3] and all(
        x.finish_reason in ("stop", "length") for o in sampled for x in o
    )
    a1 = _random_adapter(tiny_model_dir, str(tmp_path / "a1"), 1)
    a2 = _random_adapter(tiny_model_dir, str(tmp_path / "a2"), 2)
    s.set_adapter(a1)
    with_a1 = [o[0].token_ids for o in s.generate(CONVS, greedy)]
    s.set_adapter(a2)
    with_a2 = [o[0].token_ids for o in s.generate(CONVS, greedy)]
    assert with_a1 != base and with_a2 != with_a1, "each new adapter is live on the next call"
    s.set_adapter(None)
    assert [o[0].token_ids for o in s.generate(CONVS, greedy)] == base
    assert s.lora_sync == lora_sync and len(s.merge_s) == (3 if lora_sync == "merge" else 0)
    # the same path rewritten with a2's weights (a resumed iteration retrains in place) is sampled anew
    s.set_adapter(a1)
    assert [o[0].token_ids for o in s.generate(CONVS, greedy)] == with_a1
    _random_adapter(tiny_model_dir, a1, 2)
    s.set_adapter(a1)
    assert [o[0].token_ids for o in s.generate(CONVS, greedy)] == with_a2
    _random_adapter(tiny_model_dir, a1, 1)
    # an adapter of other modules after a1 (merge: a1's modules go back to the checkpoint's weights)
    a3 = _random_adapter(tiny_model_dir, str(tmp_path / "a3"), 3, targets=("o_proj", "up_proj"))
    s.set_adapter(a1)
    s.generate(CONVS, greedy)
    s.set_adapter(a3)
    with_a3 = [o[0].token_ids for o in s.generate(CONVS, greedy)]
    if lora_sync == "merge":  # a merge that fails leaves weights of no known adapter: the next one reloads all
        bad = _random_adapter(tiny_model_dir, str(tmp_path / "bad"), 4)
        f = Path(bad) / "adapter_model.safetensors"
        save_file({k.replace("layers.1.", "layers.7."): v for k, v in load_file(str(f)).items()}, str(f))
        s.set_adapter(bad)
        with pytest.raises(ValueError, match="missing from the checkpoint"):
            s.generate(CONVS, greedy)
        s.set_adapter(None)
        assert [o[0].token_ids for o in s.generate(CONVS, greedy)] == base
        s.set_adapter(a3)
        assert [o[0].token_ids for o in s.generate(CONVS, greedy)] == with_a3

    # the HF engine agrees with vLLM on greedy tokens for the same adapter (same prompts, same ids)
    hf = HFSampler(tiny_model_dir, SamplingConfig(engine="hf"), seed=0)
    hf.set_adapter(a1)
    assert [o[0].token_ids for o in hf.generate(CONVS, greedy)] == with_a1
    hf.set_adapter(a3)
    assert [o[0].token_ids for o in hf.generate(CONVS, greedy)] == with_a3


def test_engine_process_dying_during_startup_is_an_error_not_a_hang():
    # A child that exits while "startup" blocks, as vLLM's engine core did when its KV-cache check failed
    # after the handshake: the watch turns the 600 s wait into a RuntimeError naming the process. Run in a
    # fresh interpreter, as the CLI is, with a SIGINT handler that swallows the signal installed first.
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import signal, subprocess, sys, time\n"
        "from train.engine.vllm import _engine_death_watch\n"
        "signal.signal(signal.SIGINT, lambda *_: None)\n"
        "t0 = time.monotonic()\n"
        "try:\n"
        "    with _engine_death_watch(grace_s=1.0):\n"
        "        child = subprocess.Popen([sys.executable, '-c', 'raise SystemExit(1)'])\n"
        "        time.sleep(60)\n"
        "    print('NO ERROR')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e, round(time.monotonic() - t0), child.wait(timeout=5))\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": root})  # fmt: skip
    line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:]
    assert line.startswith("ERROR the vLLM engine process (pid "), line
    assert "exited during startup" in line
    seconds, child_status = map(int, line.split()[-2:])
    assert seconds < 30 and child_status == 1, line


def test_vllm_rounding_warnings_are_counted_and_other_warnings_pass():
    """An engine start printed one warning per float32 tensor rounded into the bf16 engine (122 for SmolLM2)."""
    import logging

    from train.engine.vllm import rounding_warnings_counted

    logger = logging.getLogger("vllm.model_executor.models.utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    level = logger.level
    logger.setLevel(logging.WARNING)  # whatever level an earlier test left vLLM's loggers at
    logger.addHandler(handler)
    try:
        with rounding_warnings_counted() as rounded:
            for name in ("a.weight", "b.weight"):
                logger.warning(
                    "Attempted to load weight %s with dtype %s into parameter with dtype %s", name, "f32", "bf16"
                )
            logger.warning("Attempted to load nested weight %r into a single parameter %r", "c", "d")
        logger.warning("Attempted to load weight %s with dtype %s into parameter with dtype %s", "e", "f32", "bf16")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert rounded.count == 2
    assert seen == [
        "Attempted to load nested weight 'c' into a single parameter 'd'",
        "Attempted to load weight e with dtype f32 into parameter with dtype bf16",  # outside: not ours to hide
    ]
