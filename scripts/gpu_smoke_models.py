"""Random-weight models of the GPU recipes' shapes and a word-level tokenizer for scripts/gpu_smoke.py: no weights
or tokenizer files can be brought to the GPU machine, so both are built there. Imports only the standard library at
module level (transformers and tokenizers are imported when a model is built)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

# Published configs (config.json of each hub model); vocab = embedding rows. Special-token ids come from our tokenizer.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
}  # fmt: skip
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True)  # fmt: skip
SHAPES |= {"tiny-llama": {"model_type": "llama", **TINY}, "tiny-qwen2": {"model_type": "qwen2", **TINY}}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
WORDS0 = len(SPECIALS) + 3  # ids below: specials and the role names


def build_tokenizer(vocab_size: int) -> Any:
    """Word-level tokenizer, ChatML template: `w<i>` is one token, every id decodes (random models emit any id)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [*SPECIALS, "system", "user", "assistant"] + [f"w{i}" for i in range(vocab_size - WORDS0)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(shape: str, dest: Path) -> Path:
    """Random-init the shape directly on the device in its training dtype and save it as safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (dest / "config.json").is_file():
        return dest
    spec = dict(SHAPES[shape])
    tok = build_tokenizer(spec["vocab_size"])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=None,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return dest


def words(rng: Any, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(min(vocab - WORDS0, 5000))}" for _ in range(n))
