"""The recipe keys of the `problems` phase (train/algorithms/problems.py), one set shared by the algorithms whose
model writes its own prompts: ScPO (`scpo.new_problems`) and Self-/Meta-Rewarding (`meta_rewarding.new_problems`).
The same names in both sections, so the phase reads one set of keys whichever algorithm runs it."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ProblemWriting(BaseModel):
    """Mixed into a section (`class ScpoConfig(Section, ProblemWriting)`); its fields come first in that section."""

    new_problems: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Prompts the model writes itself and keeps per iteration, few-shot from the seed prompts (ScPO "
        "§2: a new problem is kept when its k votes agree with share ≥ τ; Self-Rewarding §2.3/§3.2: self-instruction "
        "creation with Self-Instruct's filters). 0 = off: train on the seed prompts only.",
    )
    seed_problems: bool = Field(True, description="With new_problems > 0, also train on the seed (dataset) prompts.")
    problem_exemplars: int = Field(
        4, ge=1, le=64, description="Seed prompts shown per writing prompt (Self-Rewarding §3.2 uses 8)."
    )
    problem_candidates: int = Field(
        256, ge=1, le=10_000_000, description="Most prompts written per iteration while looking for new_problems."
    )
    problem_temperature: float = Field(
        1.0, ge=0.0, description="Sampling temperature when writing prompts (Self-Rewarding §3.2: 0.6)."
    )
