"""Atomic artifacts and phase skipping: what makes resume free."""

from __future__ import annotations

import json
import os

import pytest

from train.config import Recipe
from train.loop import Run
from train.runtime.artifacts import ChunkLog, commit_dir, read_jsonl, write_jsonl


def test_write_jsonl_is_atomic_and_counts(tmp_path):
    path = tmp_path / "a.jsonl"
    assert write_jsonl(path, ({"i": i} for i in range(3))) == 3
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert not (tmp_path / "a.jsonl.tmp").exists()


def test_failed_write_never_publishes(tmp_path):
    path = tmp_path / "a.jsonl"

    def rows():
        yield {"i": 0}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert not path.exists(), "a half-written file must not appear under its final name"


def test_chunk_log_survives_torn_line_and_finishes(tmp_path):
    log = ChunkLog(tmp_path / "s.jsonl", key=lambda row: row["id"])
    log.append([{"id": 1}, {"id": 2}])
    with open(log.partial, "a") as f:
        f.write('{"rows": [{"id": 3, "te')  # SIGKILL mid-write (tests/unit/test_chunklog.py kills for real)
    log = ChunkLog(tmp_path / "s.jsonl", key=lambda row: row["id"])
    assert log.done == {1, 2}
    assert not log.final.exists()
    done, _ = log.collect()
    log.finish([done[1][0], done[2][0]])
    assert read_jsonl(log.final) == [{"id": 1}, {"id": 2}] and not log.partial.exists()


def test_commit_dir_replaces(tmp_path):
    tmp, final = tmp_path / "adapter.tmp", tmp_path / "adapter"
    final.mkdir()
    (final / "old").write_text("x")
    tmp.mkdir()
    (tmp / "new").write_text("y")
    commit_dir(tmp, final)
    assert sorted(os.listdir(final)) == ["new"] and not tmp.exists()


def _run(tmp_path) -> Run:
    recipe = Recipe.model_validate({"algorithm": "scpo", "output_dir": str(tmp_path / "out")})
    return Run(recipe, model_path="unused")  # no model: these tests exercise phase bookkeeping only


def test_phase_skips_when_artifact_complete_and_keeps_metrics(tmp_path):
    run = _run(tmp_path)
    artifact = run.iter_dir(1) / "votes.jsonl"
    calls = []

    def fn():
        calls.append(1)
        write_jsonl(artifact, [{"x": 1}])
        return {"consistency": 0.5}

    assert run.phase(1, "vote", artifact, fn) == {"consistency": 0.5}
    mtime = artifact.stat().st_mtime_ns
    assert run.phase(1, "vote", artifact, fn) == {"consistency": 0.5}
    assert len(calls) == 1 and artifact.stat().st_mtime_ns == mtime
    rows = run.write_metrics(1)
    assert rows[-1]["iteration"] == 1 and rows[-1]["vote/consistency"] == 0.5 and "time/vote_s" in rows[-1]


def test_half_written_artifact_is_not_complete(tmp_path):
    run = _run(tmp_path)
    artifact = run.iter_dir(1) / "samples.jsonl"
    artifact.parent.mkdir(parents=True)
    (artifact.parent / "samples.jsonl.tmp").write_text('{"half": ')
    (artifact.parent / "samples.jsonl.partial").write_text('{"id": 1}\n')
    ran = []
    run.phase(1, "generate", artifact, lambda: ran.append(1) or write_jsonl(artifact, []) and {} or {})
    assert ran == [1]


def test_metrics_jsonl_rewritten_not_appended(tmp_path):
    run = _run(tmp_path)
    for _ in range(2):
        run.phase(
            1,
            "pairs",
            run.iter_dir(1) / "pairs.jsonl",
            lambda: write_jsonl(run.iter_dir(1) / "pairs.jsonl", []) and {"pairs": 0} or {"pairs": 0},
        )
        run.write_metrics(1)
    lines = (run.out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["pairs/pairs"] == 0


def _adapter_on_disk(path) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"lora_A": torch.zeros(8, 4)}, str(path / "adapter_model.safetensors"))


def test_eval_checkpoints_include_the_sft_seed_and_stop_at_the_first_missing_adapter(tmp_path):
    """`selfreward eval` measures what the run measured at iteration 0 (the SFT seed when one was trained)."""
    from train.cli import eval_checkpoints

    out = tmp_path / "out"
    for k in (0, 1, 3):  # iter_2 missing: iter_3 was not trained from a whole iter_2
        _adapter_on_disk(out / f"iter_{k}" / "adapter")
    with_sft = Recipe.model_validate(
        {"algorithm": "meta_rewarding", "output_dir": str(out), "sft": {"enabled": True, "ift_file": "ift.jsonl"}}
    )
    names = [(n, a and a.parent.name) for n, a in eval_checkpoints(Run(with_sft, model_path="unused"))]
    assert names == [("base", None), ("sft", "iter_0"), ("iter_1", "iter_1")]
    without = Recipe.model_validate({"algorithm": "meta_rewarding", "output_dir": str(out)})
    assert [n for n, _ in eval_checkpoints(Run(without, model_path="unused"))] == ["base", "iter_1"]
