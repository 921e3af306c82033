"""Meta-Rewarding's judge pairs as the paper builds them (Wu et al., 2024, §2.2; issue 14, item 4).

The meta-judge phase runs on a fake engine whose verdicts follow a "[q=N]" quality tag in each judgement, so which
judgement wins is known: the tests check which judgements are meta-judged, how they are shown, and which pairs
survive.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from rewards.judge import meta_judge_prompt
from rewards.judge_pairs import meta_judge_candidates, select_judge_pair
from train.algorithms.meta_rewarding import build_judge_pairs
from train.config import Recipe
from train.engine import Sample
from train.loop import Run
from train.runtime.artifacts import read_jsonl, write_jsonl

MAX_CHARS = 200
LONG = "long " * 60  # 300 characters: over MAX_CHARS


class _TaggedEngine:
    """Meta-judge verdicts by the "[q=N]" tags of the two judgements in the prompt; records every prompt."""

    tokenizer = None

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def set_adapter(self, path: str | None) -> None:
        pass

    def generate(self, convs, params, desc=""):
        out = []
        for conv in convs:
            text = conv[-1]["content"]
            self.prompts.append(text)
            qa, qb = (int(q) for q in re.findall(r"\[q=(\d+)\]", text))
            out.append([Sample(f"Winner: Judgement {'A' if qa > qb else 'B'}", [1], "stop")])
        return out


# prompt id -> the judgements of each of its responses, as (text, parsed score)
JUDGED: dict[str, list[list[tuple[str, float | None]]]] = {
    # An unparsed judgement that would beat every other one if it were meta-judged.
    "unparsed": [
        [("[q=1] fine. Score: 5", 5.0), ("[q=3] thin. Score: 2", 2.0), ("[q=9] rambles, no verdict", None),
         ("[q=2] so-so. Score: 3", 3.0)],
        [("[q=1] Score: 4", 4.0), ("[q=2] Score: 4", 4.0)],
    ],
    # The meta-judge's favourite is over-long.
    "long_chosen": [[(f"[q=5] {LONG}Score: 1", 1.0), ("[q=1] Score: 5", 5.0), ("[q=2] Score: 3", 3.0)]],
    # The meta-judge's least favourite is over-long.
    "long_rejected": [[(f"[q=0] {LONG}Score: 5", 5.0), ("[q=4] Score: 1", 1.0), ("[q=2] Score: 3", 3.0)]],
    # Best and worst give the same score; two responses both with varied scores.
    "equal_scores": [
        [("[q=3] Score: 4", 4.0), ("[q=1] Score: 4", 4.0), ("[q=2] Score: 2", 2.0)],
        [("[q=1] Score: 4", 4.0), ("[q=2] Score: 3", 3.0)],  # smaller variance: not the one meta-judged
    ],
}  # fmt: skip


def _run_meta_judge(tmp_path: Path, monkeypatch) -> tuple[Run, _TaggedEngine, dict]:
    monkeypatch.setattr("train.loop.resolve_model", lambda model: "unused")
    recipe = Recipe.model_validate({
        "algorithm": "meta_rewarding", "output_dir": str(tmp_path / "out"),
        "meta_rewarding": {"num_responses": 2, "num_judgements": 4, "max_judgement_chars": MAX_CHARS,
                           "force_verdict": False},
    })  # fmt: skip
    run = Run(recipe)
    d = run.iter_dir(1)
    d.mkdir(parents=True)
    responses, judgements = [], []
    for pid, per_response in JUDGED.items():
        for idx, judged in enumerate(per_response):
            responses.append({"prompt_id": pid, "prompt": f"Question {pid}?", "response_idx": idx,
                              "text": f"answer {idx}"})  # fmt: skip
            scores = [s for _, s in judged]
            valid = [s for s in scores if s is not None]
            judgements.append({"prompt_id": pid, "response_idx": idx, "judge_texts": [t for t, _ in judged],
                               "scores": scores, "mean_score": sum(valid) / len(valid)})  # fmt: skip
    write_jsonl(d / "responses.jsonl", responses)
    write_jsonl(d / "judgements.jsonl", judgements)
    engine = _TaggedEngine()
    run._sampler = engine
    metrics = build_judge_pairs(run, 1)
    return run, engine, metrics


def _pairs(run: Run) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in read_jsonl(run.iter_dir(1) / "judge_pairs.jsonl"):
        out.setdefault(p["prompt_id"], []).append(p)
    return out


def test_unparsed_judgements_are_never_meta_judged(tmp_path, monkeypatch):
    run, engine, metrics = _run_meta_judge(tmp_path, monkeypatch)
    assert not any("rambles, no verdict" in p for p in engine.prompts)
    # 3 scored judgements per picked response, every ordered pair: 3·2 comparisons for each of the 4 prompts
    assert metrics["meta_comparisons"] == len(engine.prompts) == 4 * 6
    pair = _pairs(run)["unparsed"][0]
    assert (pair["chosen"], pair["rejected"]) == ("[q=3] thin. Score: 2", "[q=1] fine. Score: 5")


def test_an_over_long_chosen_judgement_drops_the_pair(tmp_path, monkeypatch):
    run, engine, metrics = _run_meta_judge(tmp_path, monkeypatch)
    long_text = JUDGED["long_chosen"][0][0][0]
    assert sum(long_text in p for p in engine.prompts) == 4, "the long judgement is meta-judged like the others"
    assert "long_chosen" not in _pairs(run), "no fall-back to the best short judgement"
    assert metrics["judge_pairs_dropped_long_chosen"] == 1
    assert metrics["judge_pairs"] == 3


def test_an_over_long_rejected_judgement_is_kept(tmp_path, monkeypatch):
    run, _, _ = _run_meta_judge(tmp_path, monkeypatch)
    (pair,) = _pairs(run)["long_rejected"]
    assert pair["chosen"] == "[q=4] Score: 1"
    assert pair["rejected"] == JUDGED["long_rejected"][0][0][0] and len(pair["rejected"]) > MAX_CHARS


def test_equal_scores_form_a_judge_pair_and_one_pair_per_prompt(tmp_path, monkeypatch):
    run, _, _ = _run_meta_judge(tmp_path, monkeypatch)
    pairs = _pairs(run)
    (pair,) = pairs["equal_scores"]  # two responses with varied scores, one judge pair
    assert (pair["chosen"], pair["rejected"]) == ("[q=3] Score: 4", "[q=1] Score: 4")
    assert all(len(v) == 1 for v in pairs.values()) and len(pairs) <= len(JUDGED)


def test_the_meta_judge_sees_each_judgement_whole_with_its_score(tmp_path, monkeypatch):
    _, engine, _ = _run_meta_judge(tmp_path, monkeypatch)
    for prompt in engine.prompts:
        a, b = re.findall(r"Judgment A: (.*?)\n\nJudgment B: (.*?)\n\n", prompt, re.DOTALL)[0]
        assert re.search(r"Score: \d$", a) and re.search(r"Score: \d$", b)
    text = meta_judge_prompt("Q?", "R.", "[q=1] fine. Score: 5", "[q=2] so-so. Score: 3")
    assert "Judgment A: [q=1] fine. Score: 5\n" in text and "Judgment B: [q=2] so-so. Score: 3\n" in text


def test_pure_selection_matches_the_phase():
    assert meta_judge_candidates([5.0, None, 0.0, None]) == [0, 2]
    texts = ["x" * 30 + " Score: 5", "ok. Score: 5", "meh. Score: 2"]
    elo = np.array([1.0, 0.5, -1.0])
    assert select_judge_pair(texts, [5.0, 5.0, 2.0], elo, max_chars=20) is None
    assert select_judge_pair(texts, [5.0, 5.0, 2.0], elo, max_chars=None)["chosen_index"] == 0
    same = select_judge_pair(["ok. Score: 4", "meh. Score: 4"], [4.0, 4.0], np.array([0.5, -0.5]), max_chars=20)
    assert (same["chosen"], same["rejected"]) == ("ok. Score: 4", "meh. Score: 4")
