"""A run directory is a faithful record of the recipe that made it: reruns after an edit redo exactly the stale
phases (and what depends on them), never reuse results made from other inputs, and `status` says which and why.

Real ScPO runs on the tiny random Llama with the HF engine, in-process through the CLI.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.algorithms.test_faults import RECIPE, tiny_scpo
from train.cli import main

PHASES = ["generate", "vote", "pairs", "train"]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _states(capsys, out: Path, *overrides: str) -> dict[str, tuple[str, str]]:
    """`selfreward status` for the recipe with `overrides`: phase -> (state, why), iteration 1."""
    target = [str(out)] if not overrides else [RECIPE, *overrides]
    code, text, err = _cli(capsys, "status", *target)
    assert code == 0, err[-2000:]
    rows = [re.split(r"\s+", line, maxsplit=3) for line in text.splitlines()[1:]]
    return {r[1]: (r[2], r[3] if len(r) > 3 else "") for r in rows if r[0] == "1"}


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """One finished ScPO iteration (fingerprints recorded), shared by the status checks."""
    out = tmp_path_factory.mktemp("state") / "run"
    code = main(["run", RECIPE, *tiny_scpo(tiny_model_dir, out)])
    assert code == 0
    return out


def test_status_names_exactly_the_stale_phases(finished, tiny_model_dir, capsys):
    base = tiny_scpo(tiny_model_dir, finished)
    assert {p: s for p, (s, _) in _states(capsys, finished).items()} == dict.fromkeys(PHASES, "done")
    assert {p: s for p, (s, _) in _states(capsys, finished, *base).items()} == dict.fromkeys(PHASES, "done")

    sampling = _states(capsys, finished, *base, "sampling.temperature=0.3")
    assert [p for p in PHASES if sampling[p][0] == "stale"] == PHASES
    assert sampling["generate"][1] == "sampling.temperature: 0.7 -> 0.3"
    assert sampling["pairs"][1] == "input iter_1/generate changed"

    # how the engine samples with the adapter changes its numerics (bf16: merged weights vs a LoRA branch)
    sync = _states(capsys, finished, *base, "sampling.lora_sync=adapter")
    assert [p for p in PHASES if sync[p][0] == "stale"] == PHASES
    assert sync["generate"][1] == 'sampling.lora_sync: "auto" -> "adapter"'

    threshold = _states(capsys, finished, *base, "scpo.vote_threshold=[0.5]")
    assert [p for p in PHASES if threshold[p][0] == "stale"] == ["pairs", "train"], threshold
    assert threshold["pairs"][1] == "vote_threshold: 0.0 -> 0.5"

    trainer = _states(capsys, finished, *base, "trainer.learning_rate=0.5")
    assert [p for p in PHASES if trainer[p][0] == "stale"] == ["train"]
    assert trainer["train"][1].startswith("trainer: ")

    data = _states(capsys, finished, *base, "data.max_a=50")  # other synthetic prompts
    assert [p for p in PHASES if data[p][0] == "stale"] == PHASES and data["generate"][1] == "prompts changed"

    engine_size = _states(capsys, finished, *base, "sampling.batch_size=7")  # changes no result
    assert {p for p, (s, _) in engine_size.items()} == set(PHASES)
    assert all(s == "done" for s, _ in engine_size.values())


def test_code_version_alone_reuses_results_and_result_version_does_not(finished, tiny_model_dir, capsys, monkeypatch):
    import importlib.metadata

    import train.loop

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "selfreward" else real(name))
    assert all(s == "done" for s, _ in _states(capsys, finished).values())
    monkeypatch.setattr(train.loop, "RESULT_VERSION", train.loop.RESULT_VERSION + 1)
    bumped = _states(capsys, finished)
    assert all(s == "stale" for s, _ in bumped.values()) and bumped["generate"][1] == "result_version: 1 -> 2"


def test_a_lowered_threshold_is_used_on_rerun_not_the_empty_pairs(tiny_model_dir, tmp_path, capsys):
    """The issue's example: 0 pairs at τ = 1.0 and advice to lower it; the rerun at a lower τ must rebuild the pairs
    from the same samples, not stop on the empty pairs.jsonl again."""
    out = tmp_path / "run"
    strict = tiny_scpo(tiny_model_dir, out, "scpo.min_vote_margin=1", "scpo.vote_threshold=[1.0]")
    code, _, err = _cli(capsys, "run", RECIPE, *strict)
    assert code == 1 and "iteration 1 produced 0 preference pairs (vote threshold 1.0·k)" in err
    samples = out / "iter_1" / "samples.jsonl"
    before = samples.stat().st_mtime_ns

    code, _, err = _cli(capsys, "run", RECIPE, *tiny_scpo(tiny_model_dir, out))  # τ = 0, ties kept: pairs exist
    assert code == 0, err[-3000:]
    assert "iter 1: generate done (samples.jsonl), skipping" in err
    assert "iter 1: pairs is stale (vote_threshold: 1.0 -> 0.0; scpo.min_vote_margin: 1 -> 0)" in err
    assert samples.stat().st_mtime_ns == before, "the samples were reused"
    assert (out / "iter_1" / "pairs.jsonl").read_text() and (out / "iter_1" / "adapter").is_dir()


def test_redo_redoes_one_phase_and_what_depends_on_it(finished, tiny_model_dir, capsys):
    votes = finished / "iter_1" / "votes.jsonl"
    samples_before = (finished / "iter_1" / "samples.jsonl").stat().st_mtime_ns
    votes_before = votes.stat().st_mtime_ns
    code, _, err = _cli(capsys, "run", RECIPE, *tiny_scpo(tiny_model_dir, finished), "--redo", "pairs")
    assert code == 0, err[-3000:]
    assert "iter 1: pairs is stale (--redo)" in err
    assert "iter 1: train is stale (input iter_1/pairs was redone)" in err
    assert (finished / "iter_1" / "samples.jsonl").stat().st_mtime_ns == samples_before
    assert votes.stat().st_mtime_ns == votes_before
