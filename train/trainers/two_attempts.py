"""SCoRe's two-attempt rollout as one exact token sequence, and the self-correction metrics.

    x1 = chat(question)                                   y1 ~ π(·|x1)          attempt 1
    x2 = x1 + y1 + end-of-turn + user: instruction + assistant-start            (never says if y1 was right)
                                                          y2 ~ π(·|x2)          attempt 2

The trainer sees one completion per rollout, y1 + instruction + y2, with `turns` = 1 / 0 / 2 per token (0 = injected
instruction tokens, excluded from the loss via TRL's `env_mask`). Attempt 2 is sampled from x2's exact token ids
(`Sampler.generate_ids`): re-rendering y1 through the chat template could re-tokenize it, and then the trainer would
score tokens the engine never conditioned on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from train.config import DataConfig, ScoreConfig
from train.engine import Conversation, GenParams, Sampler, render_prompts

INSTRUCTION, ATTEMPT1, ATTEMPT2 = 0, 1, 2  # values of `turns`
_PLACEHOLDER = "SCORE_ATTEMPT_ONE_PLACEHOLDER"


def correction_instruction(score: ScoreConfig, data: DataConfig) -> str:
    """The fixed user turn between the attempts, plus the data's final-answer format clause, if any."""
    return score.correction_instruction + (f"\n{data.instruction}" if data.instruction else "")


def correction_suffix_ids(tokenizer: Any, conversation: Conversation, instruction: str) -> list[int]:
    """Template tokens from the end of attempt 1 to the start of attempt 2, e.g. for ChatML:
    `<|im_end|>\\n<|im_start|>user\\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n`."""
    turn2 = [*conversation, {"role": "assistant", "content": _PLACEHOLDER}, {"role": "user", "content": instruction}]
    text = tokenizer.apply_chat_template(turn2, tokenize=False, add_generation_prompt=True)
    suffix = text[text.rindex(_PLACEHOLDER) + len(_PLACEHOLDER) :]
    return list(tokenizer(suffix, add_special_tokens=False)["input_ids"])


def _eos_ids(tokenizer: Any) -> set[int]:
    return {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}


def close_attempt(attempt_ids: list[int], finish_reason: str, suffix: list[int], eos: set[int]):
    """Split the end-of-turn token between attempt 1 and the instruction.

    A model that stopped itself generated the end-of-turn token: it belongs to attempt 1 (trained), whether the engine
    returned it (vLLM) or stripped it (HF). A truncated attempt did not: the template closes its turn (masked).
    """
    if suffix and suffix[0] in eos and finish_reason == "stop":
        return (attempt_ids if attempt_ids[-1:] == suffix[:1] else [*attempt_ids, suffix[0]]), suffix[1:]
    return list(attempt_ids), list(suffix)


@dataclass
class Rollout:
    prompt_ids: list[int]
    attempt1_ids: list[int]
    instruction_ids: list[int]
    attempt2_ids: list[int]
    attempt1: str
    attempt2: str
    finish1: str
    finish2: str

    @property
    def completion_ids(self) -> list[int]:
        return self.attempt1_ids + self.instruction_ids + self.attempt2_ids

    @property
    def turns(self) -> list[int]:
        return (
            [ATTEMPT1] * len(self.attempt1_ids)
            + [INSTRUCTION] * len(self.instruction_ids)
            + [ATTEMPT2] * len(self.attempt2_ids)
        )

    @property
    def env_mask(self) -> list[int]:
        """TRL's mask of model-generated tokens: 0 on the injected instruction."""
        return [int(t != INSTRUCTION) for t in self.turns]


def two_attempt_rollouts(
    sampler: Sampler, conversations: list[Conversation], instruction: str, params: GenParams, desc: str = "rollout"
) -> list[Rollout]:
    """One two-attempt rollout per conversation (repeat a conversation to get several), with the loaded adapter."""
    tok = sampler.tokenizer
    one = GenParams(n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens)
    prompts = render_prompts(tok, conversations)
    first = sampler.generate_ids(prompts, one, desc=f"{desc} attempt 1")
    eos = _eos_ids(tok)
    suffixes: dict[str, list[int]] = {}
    turn2: list[tuple[list[int], list[int]]] = []
    for conv, (s1,) in zip(conversations, first):
        key = repr(conv)
        if key not in suffixes:
            suffixes[key] = correction_suffix_ids(tok, conv, instruction)
        turn2.append(close_attempt(list(s1.token_ids), s1.finish_reason, suffixes[key], eos))
    second = sampler.generate_ids([p + a1 + ins for p, (a1, ins) in zip(prompts, turn2)], one, desc=f"{desc} attempt 2")
    return [
        Rollout(p, a1, ins, list(s2.token_ids), s1.text, s2.text, s1.finish_reason, s2.finish_reason)
        for p, (a1, ins), (s1,), (s2,) in zip(prompts, turn2, first, second)
    ]


def correction_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """acc_t1, acc_t2, Δ(t1,t2), Δ_i→c, Δ_c→i (paper Table 3), edit rate and lengths.

    Rows need `correct1`/`correct2` (bool, or None when the gold answer does not parse: excluded and counted).
    All rates share one denominator and are computed from integer counts, so Δ = Δ_i→c − Δ_c→i holds by construction.
    """
    kept = [r for r in rows if r["correct1"] is not None and r["correct2"] is not None]
    n = len(kept)
    c1 = sum(bool(r["correct1"]) for r in kept)
    c2 = sum(bool(r["correct2"]) for r in kept)
    i2c = sum(not r["correct1"] and bool(r["correct2"]) for r in kept)
    c2i = sum(bool(r["correct1"]) and not r["correct2"] for r in kept)
    assert c2 - c1 == i2c - c2i  # every row is c→c, i→i, i→c or c→i
    rate = (lambda k: k / n) if n else (lambda k: 0.0)
    return {
        "n": n,
        "excluded_unparseable_gold": len(rows) - n,
        "acc_t1": rate(c1),
        "acc_t2": rate(c2),
        "delta": rate(c2 - c1),
        "delta_i2c": rate(i2c),
        "delta_c2i": rate(c2i),
        "count_i2c": i2c,
        "count_c2i": c2i,
        "edit_rate": sum(r["attempt1"].strip() != r["attempt2"].strip() for r in rows) / len(rows) if rows else 0.0,
        "answer_change_rate": sum(r["answer1"] != r["answer2"] for r in rows) / len(rows) if rows else 0.0,
        "len_t1": sum(r["len1"] for r in rows) / len(rows) if rows else 0.0,
        "len_t2": sum(r["len2"] for r in rows) / len(rows) if rows else 0.0,
    }


def rollout_rows(rollouts: list[Rollout], items: list[dict[str, Any]], answer_type: str) -> list[dict[str, Any]]:
    """JSONL rows for rollouts of `items` (id, prompt, answer), judged by the gold-answer verifier."""
    from rewards.answers import answers_equal, extract_answer, parse_gold
    from rewards.verifier import prompt_text

    rows = []
    for ro, it in zip(rollouts, items):
        gold = parse_gold(it.get("answer"), answer_type) if it.get("answer") is not None else None
        a1, a2 = extract_answer(ro.attempt1, answer_type), extract_answer(ro.attempt2, answer_type)
        rows.append(
            {
                "prompt_id": it.get("id"),
                "prompt": prompt_text(it.get("prompt", "")),
                "gold": it.get("answer"),
                "attempt1": ro.attempt1,
                "attempt2": ro.attempt2,
                "answer1": a1,
                "answer2": a2,
                "correct1": None if gold is None else a1 is not None and bool(answers_equal(a1, gold, answer_type)),
                "correct2": None if gold is None else a2 is not None and bool(answers_equal(a2, gold, answer_type)),
                "len1": len(ro.attempt1_ids),
                "len2": len(ro.attempt2_ids),
                "finish1": ro.finish1,
                "finish2": ro.finish2,
                "prompt_ids": ro.prompt_ids,
                "completion_ids": ro.completion_ids,
                "turns": ro.turns,
            }
        )
    return rows
