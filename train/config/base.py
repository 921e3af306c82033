"""What every recipe section shares: the base class (unknown keys are errors) and the bounds on numeric fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Generous upper bounds: a value above them is a typo (`1e20`), refused before any model loads, with the limit.
MAX_TOKENS = 2**21  # 2M tokens: any context window or completion length in sight
MAX_SAMPLES = 1024  # samples, responses or judgements per prompt
MAX_LORA_RANK = 512  # the largest rank vLLM serves (train.engine.VLLM_LORA_RANKS[-1]; a test keeps them equal)
MAX_OPERAND = 1000  # synthetic arithmetic: (max_a + 1) * (max_b + 1) questions are enumerated
MAX_SECONDS = 30 * 86400.0  # timeouts: 30 days (timedelta and the process group take no more)
MAX_SEED = 2**31 - 1 - 4096  # numpy takes seeds below 2**32; each process adds its rank


def unit_fractions(values: list[float]) -> list[float]:
    if not values or any(not 0.0 <= t <= 1.0 for t in values):
        raise ValueError("must be a non-empty list of fractions in [0, 1]")
    return values


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
