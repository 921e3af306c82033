"""The SFT seed phase of Self-/Meta-Rewarding: M1 = SFT(M0), phase `sft` of iteration 0, before iteration 1.

Self-Rewarding (Yuan et al., 2024, arXiv 2401.10020): §2.1-2.2 define the two seed sets, §2.4 the model sequence
("M1: initialized with M0, fine-tuned on the IFT+EFT seed data using SFT"), §3.1 the data. IFT = Open Assistant's
human-written first-turn answers of rank 0 (3,200 examples); EFT = the LLM-as-a-Judge prompt (Figure 2's additive
5-point rubric) for an (instruction, response) pair → a chain-of-thought justification ending in the score, kept when
its ranking agrees with the human one (1,630 examples). Meta-Rewarding (Wu et al., 2024, arXiv 2407.19594, §3.1)
starts from Llama-3-8B-Instruct fine-tuned on that EFT set alone (`sft.eft_file` without `sft.ift_file`).

Here both sets are JSONL files the recipe names (the papers' EFT judgements are not public); the adapter trained on
them is `iter_0/adapter`, `Run.adapter(0)`, which iteration 1 samples, judges and trains from, and which is its DPO
reference (the model at the start of the iteration). With `sft.enabled: false` nothing of this runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewards.judge import judge_prompt, parse_score
from train.config import Recipe
from train.config.sft import SFT_TRAINER_KEYS
from train.data import conversation, jsonl_objects
from train.errors import ConfigError
from train.runtime.fingerprints import digest

if TYPE_CHECKING:  # the CLI's preflight imports check_sft_data: no engine or trainer imports at validation
    from train.loop import Run

# The recipe keys the phase's result depends on (train/runtime/fingerprints.py): its section, the LoRA it trains,
# the seeds and dtypes, how the actor's prompt is rendered for IFT rows, and the precision keys it takes from
# `trainer:`. Not `trainer` as a whole: editing the DPO iterations' learning rate must not redo the SFT.
READS = ("sft", "lora", "seed", "model_dtype", "trust_remote_code", "data.instruction", "data.system_prompt",
         *(f"trainer.{k}" for k in SFT_TRAINER_KEYS))  # fmt: skip


def _strings(path: str, key: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of the JSONL file at recipe key `key`: its string `fields` and `_line`; every error names the key."""
    try:
        rows = []
        for n, row in jsonl_objects(path, "SFT data file"):
            for field in fields:
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise ConfigError(f"{path}:{n}: field `{field}` must be a non-empty string")
            rows.append({f: row[f] for f in fields} | {"_line": n})
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    if not rows:
        raise ConfigError(f"{key}: {path} has no examples")
    return rows


def ift_rows(recipe: Recipe) -> list[dict[str, Any]]:
    """IFT examples as TRL prompt-completion rows, prompted as the actor is (`train.data.conversation`)."""
    if not recipe.sft.ift_file:
        return []
    return [
        {
            "prompt": conversation({"prompt": r["prompt"]}, recipe.data),
            "completion": [{"role": "assistant", "content": r["response"]}],
        }
        for r in _strings(recipe.sft.ift_file, "sft.ift_file", ("prompt", "response"))
    ]


def eft_rows(recipe: Recipe) -> list[dict[str, Any]]:
    """EFT examples as TRL prompt-completion rows, prompted as the judge is (`rewards.judge.judge_prompt`,
    Self-Rewarding Fig. 2). A judgement without a score the judge parser reads is refused: it would teach the judge a
    format its own scores are not parsed from."""
    path, rows = recipe.sft.eft_file, []
    for r in _strings(path, "sft.eft_file", ("prompt", "response", "judgement")) if path else []:
        if parse_score(r["judgement"]) is None:
            raise ConfigError(
                f"sft.eft_file: {path}:{r['_line']}: `judgement` states no score the judge parser reads "
                "(end it with `Score: <0-5>`)"
            )
        rows.append({"prompt": [{"role": "user", "content": judge_prompt(r["prompt"], r["response"])}],
                     "completion": [{"role": "assistant", "content": r["judgement"]}]})  # fmt: skip
    return rows


def check_sft_data(recipe: Recipe) -> None:
    """Preflight: with `sft.enabled`, both files exist and every row is usable (errors name the key and line)."""
    if recipe.sft.enabled:
        ift_rows(recipe)
        eft_rows(recipe)


def run_sft_seed(run: Run) -> dict[str, Any] | None:
    """Phase `sft` of iteration 0 (all ranks train, rank 0 publishes `iter_0/adapter`); None when `sft.enabled` is
    false. Resumable like a DPO iteration: mid-phase checkpoints in `iter_0/checkpoints`, skipped once published
    with the same inputs, redone (and everything after it) when a key in `READS` or a data file's content changes."""
    r = run.recipe
    if not r.sft.enabled:
        return None
    files = {key: Path(p).read_bytes() for key, p in (("ift", r.sft.ift_file), ("eft", r.sft.eft_file)) if p}

    def train() -> dict[str, Any]:
        from train.trainers.sft import train_sft  # TRL is heavy: import only when the phase runs

        ift, eft = ift_rows(r), eft_rows(r)
        run.sampler_sleep()
        metrics = train_sft(
            run.model_path,
            ift + eft,
            str(run.iter_dir(0)),
            lora=r.lora.model_dump(),
            hyper=r.sft.model_dump(),
            trainer_overrides=r.trainer,
            seed=r.seed,
            trust_remote_code=r.trust_remote_code,
            report_to=run.report_to,
            model_dtype=r.model_dtype,
        )
        return metrics | {"ift_examples": len(ift), "eft_examples": len(eft)}

    values = {f"{k}_data": digest(v.decode(errors="replace")) for k, v in files.items()}
    return run.phase(0, "sft", run.iter_dir(0) / "adapter", train, all_ranks=True, reads=READS, values=values)
