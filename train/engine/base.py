"""The sampler interface every engine implements, and what the engines share.

Trainers and algorithms never import vLLM; they call `generate`, `set_adapter` (LoRA hot-swap), `sleep` and `wake`.
Every engine takes chat conversations, renders them with the same tokenizer and returns token ids, so the engines
are interchangeable and comparable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from train.runtime import distributed as dist

Conversation = list[dict[str, str]]
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the LoRA ranks vLLM accepts


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


@dataclass
class GenParams:
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    allowed_token_ids: list[int] | None = None  # constrain every new token to these ids (forced verdicts)


class Sampler(Protocol):
    tokenizer: Any

    def generate(self, conversations: list[Conversation], params: GenParams, desc: str = "") -> list[list[Sample]]: ...
    def generate_ids(self, prompt_ids: list[list[int]], params: GenParams, desc: str = "") -> list[list[Sample]]: ...
    def set_adapter(self, path: str | None) -> None: ...
    def sleep(self) -> None: ...
    def wake(self) -> None: ...


def render_prompts(tokenizer: Any, conversations: list[Conversation]) -> list[list[int]]:
    """Chat-template each conversation once; both engines consume these ids."""
    out = []
    for conv in conversations:
        ids = tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def skip_overlong(
    prompt_ids: list[list[int]], params: GenParams | list[GenParams], limit: int, generate: Any
) -> list[list[Sample]]:
    """`generate(prompts, their params)` on the prompts that fit the context; the others get `n` empty "length" samples.
    `params`: one GenParams for all prompts, or one per prompt.

    vLLM rejects a prompt longer than max_model_len by failing the whole batch; one over-long judge prompt
    must cost one null score, not the run."""
    each = params if isinstance(params, list) else [params] * len(prompt_ids)
    fits = [i for i, ids in enumerate(prompt_ids) if len(ids) < limit]
    if len(fits) == len(prompt_ids):
        return generate(prompt_ids, each)
    logging.getLogger("selfreward").warning(
        "%d of %d prompts are longer than sampling.max_model_len=%d tokens; they get empty samples",
        len(prompt_ids) - len(fits),
        len(prompt_ids),
        limit,
    )
    out = [[Sample("", [], "length") for _ in range(p.n)] for p in each]
    done = generate([prompt_ids[i] for i in fits], [each[i] for i in fits]) if fits else []
    for i, samples in zip(fits, done):
        out[i] = samples
    return out


Batch = tuple[list[list[int]], GenParams]  # prompt ids and the params they are all sampled with


def generate_together(sampler: Sampler, batches: list[Batch], desc: str = "") -> list[list[list[Sample]]]:
    """Several batches of prompt ids, each with its own params, in one engine call where the engine takes
    per-prompt params (vLLM, `generate_ids_together`), else one call per batch. One call lets the sequences of
    all batches share each decode step and the prompts' cached prefixes: the eval's 48 greedy answers otherwise run
    as a call of their own, 48 sequences per step (docs/results.md, "One engine call per eval")."""
    together = getattr(sampler, "generate_ids_together", None)
    if together is not None:
        return together(batches, desc)
    return [sampler.generate_ids(ids, params, desc) for ids, params in batches]


def flatten_batches(batches: list[Batch]) -> tuple[list[list[int]], list[GenParams]]:
    return [ids for part, _ in batches for ids in part], [p for part, p in batches for _ in part]


def regroup_batches(batches: list[Batch], flat: list[Any]) -> list[list[Any]]:
    out, start = [], 0
    for part, _ in batches:
        out.append(flat[start : start + len(part)])
        start += len(part)
    return out


class ShardedSampler:
    """A data-parallel view of a sampler: each call samples this rank's shard of the prompts, and every rank gets all
    results in prompt order. Code written for one process (evaluation, the judge) runs sharded unchanged, as long
    as every rank makes the same calls, which holds because every rank then sees the same gathered results."""

    def __init__(self, inner: Sampler):
        self.inner, self.tokenizer = inner, inner.tokenizer

    def generate(self, conversations: list[Conversation], params: GenParams, desc: str = "") -> list[list[Sample]]:
        return dist.map_sharded(lambda part: self.inner.generate(part, params, desc), conversations)

    def generate_ids(self, prompt_ids: list[list[int]], params: GenParams, desc: str = "") -> list[list[Sample]]:
        return dist.map_sharded(lambda part: self.inner.generate_ids(part, params, desc), prompt_ids)

    def generate_ids_together(self, batches: list[Batch], desc: str = "") -> list[list[list[Sample]]]:
        """`generate_together` on this rank's shard of the prompts of all batches together."""
        ids, _ = flatten_batches(batches)
        batch_of = [b for b, (part, _) in enumerate(batches) for _ in part]  # the same GenParams may serve two batches

        def mine(part: list[int]) -> list[list[Sample]]:
            kept = [[i for i in part if batch_of[i] == b] for b in range(len(batches))]
            results = generate_together(
                self.inner, [([ids[i] for i in k], p) for k, (_, p) in zip(kept, batches)], desc
            )
            by_index = {i: r for k, rs in zip(kept, results) for i, r in zip(k, rs)}
            return [by_index[i] for i in part]

        return regroup_batches(batches, dist.map_sharded(mine, list(range(len(ids)))))

    def set_adapter(self, path: str | None) -> None:
        self.inner.set_adapter(path)

    def sleep(self) -> None:
        self.inner.sleep()

    def wake(self) -> None:
        self.inner.wake()
