"""The algorithm-specific recipe sections (`scpo:`, `meta_rewarding:`, `score:`); the table that maps an algorithm
to its section is `ALGORITHMS` in train/config/schema.py."""

from __future__ import annotations

from pydantic import Field, field_validator

from train.config.base import MAX_SAMPLES, MAX_TOKENS, Section, unit_fractions
from train.config.problem_writing import ProblemWriting


class ScpoConfig(Section, ProblemWriting):
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

    _fractions = field_validator("vote_threshold")(classmethod(lambda cls, v: unit_fractions(v)))


class MetaRewardingConfig(Section, ProblemWriting):
    num_responses: int = Field(7, ge=2, le=MAX_SAMPLES, description="K: actor responses per prompt.")
    num_judgements: int = Field(11, ge=1, le=MAX_SAMPLES, description="N: judgements per response.")
    judge_temperature: float = Field(0.8, ge=0.0, description="Temperature of the judge samples.")
    judge_max_tokens: int = Field(256, ge=16, le=MAX_TOKENS, description="Max tokens per judgement.")
    beta: float = Field(0.1, gt=0.0, description="DPO β.")
    meta_judge: bool = Field(True, description="Train the judge with meta-judge pairs (off = Self-Rewarding).")
    length_control: bool = Field(True, description="Length-controlled actor pair selection.")
    length_rho: list[float] = Field([0.0, 0.32, 0.32, 0.4], description="ρ per iteration; the last repeats.")
    _rho = field_validator("length_rho")(classmethod(lambda cls, v: unit_fractions(v)))
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
