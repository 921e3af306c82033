"""Crash-safe partial work (issue 13, section 2): ChunkLog, staged publishes, whole adapters.

Kills are real where a process can be killed cheaply: a child process runs the code under test with
`SELFREWARD_FAULT` naming the point, and SIGKILLs itself there (train/runtime/artifacts.py::fault).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train.runtime import artifacts
from train.runtime.artifacts import (
    ChunkLog,
    Staged,
    adapter_complete,
    artifact_complete,
    commit_dir,
    map_chunked,
    read_jsonl,
    safetensors_complete,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[2]


def by_prompt(row):
    return row["prompt_id"]


def rows_for(pids, n=2, tag=""):
    """n sample rows per prompt id, as a generation chunk holds them."""
    return [{"prompt_id": p, "sample": j, "text": f"{tag}{p}-{j}"} for p in pids for j in range(n)]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def child(code: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (the repo on its path), with extra environment."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)} | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- ChunkLog: torn chunks, incomplete units


def test_a_torn_chunk_is_cut_on_open_and_the_next_chunk_starts_on_a_clean_line(tmp_path):
    log = ChunkLog(tmp_path / "s.jsonl", by_prompt, need=2)
    log.append(rows_for(["p0", "p1"]))
    whole = log.partial.stat().st_size
    with open(log.partial, "a") as f:  # a kill mid-write: half of the next chunk
        f.write(json.dumps({"rows": rows_for(["p2", "p3"])})[:50])
    log = ChunkLog(tmp_path / "s.jsonl", by_prompt, need=2)
    assert log.partial.stat().st_size == whole, "the torn tail is cut on open"
    assert log.done == {"p0", "p1"}
    assert log.todo(["p0", "p1", "p2", "p3"], str) == ["p2", "p3"]
    log.append(rows_for(["p2", "p3"]))
    for line in lines(log.partial):  # nothing glued to a fragment
        assert line.endswith("\n") and json.loads(line)["rows"]
    done, _ = ChunkLog(tmp_path / "s.jsonl", by_prompt, need=2).collect()
    assert sorted(done) == ["p0", "p1", "p2", "p3"] and all(len(rows) == 2 for rows in done.values())


def test_a_unit_counts_as_done_only_with_all_its_rows(tmp_path):
    log = ChunkLog(tmp_path / "s.jsonl", by_prompt, need=3)
    log.append(rows_for(["p0"], n=3) + rows_for(["p1"], n=2))  # p1 is one sample short
    log = ChunkLog(tmp_path / "s.jsonl", by_prompt, need=3)
    assert log.done == {"p0"}
    assert log.todo(["p0", "p1"], str) == ["p1"]
    log.append(rows_for(["p1"], n=3, tag="redo-"))
    done, _ = log.collect()
    assert [r["text"] for r in done["p1"]] == ["redo-p1-0", "redo-p1-1", "redo-p1-2"], "no stale short rows mixed in"


def test_a_garbled_line_ends_what_is_read_and_a_row_line_is_no_chunk(tmp_path):
    log = ChunkLog(tmp_path / "s.jsonl", by_prompt)
    log.append(rows_for(["p0"], n=1))
    with open(log.partial, "a") as f:
        f.write('{"prompt_id": "p9"}\n')  # one row per line, as the old format wrote: not a chunk
    log.append(rows_for(["p1"], n=1))  # appended after it by a process that did not reopen
    assert ChunkLog(tmp_path / "s.jsonl", by_prompt).done == {"p0"}
    assert len(lines(log.partial)) == 1


# ---------------------------------------------------------------- ChunkLog: the rank count changes between runs


def _work_all(log: ChunkLog, units: list[str], tag: str) -> list[str]:
    todo = log.todo(units, str)
    for i in range(0, len(todo), 2):
        log.append(rows_for(todo[i : i + 2], tag=tag))
    return todo


def _published(path: Path, units: list[str]) -> list[dict]:
    log = ChunkLog(path, by_prompt, need=2)
    done, _ = log.collect()
    rows = [row for u in units for row in done[u]]
    log.finish(rows)
    return read_jsonl(path)


def test_two_ranks_partial_work_resumed_by_one_rank_loses_and_repeats_nothing(tmp_path):
    path, units = tmp_path / "s.jsonl", [f"p{i}" for i in range(9)]
    r0 = ChunkLog(path, by_prompt, need=2, shard=0, num_shards=2)
    r1 = ChunkLog(path, by_prompt, need=2, shard=1, num_shards=2)
    assert r0.todo(units, str) == units[0::2] and r1.todo(units, str) == units[1::2]
    r0.append(rows_for(["p0", "p2"], tag="r0-"))
    r1.append(rows_for(["p1", "p3"], tag="r1-"))
    r1.append(rows_for(["p5"], tag="r1-")[:1])  # a chunk one sample short of its prompt: p5 is not done
    with open(r1.partial, "a") as f:  # then rank 1 was killed mid-chunk: a torn line
        f.write('{"rows": [{"prompt_id": "p7"')
    one = ChunkLog(path, by_prompt, need=2, shard=0, num_shards=1)
    assert one.done == {"p0", "p1", "p2", "p3"}
    redone = _work_all(one, units, tag="one-")
    assert redone == ["p4", "p5", "p6", "p7", "p8"]
    rows = _published(path, units)
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(u, j) for u in units for j in range(2)]
    assert {r["text"].split("-")[0] for r in rows if r["prompt_id"] in ("p0", "p2")} == {"r0"}, "kept, not redone"
    assert {r["text"].split("-")[0] for r in rows if r["prompt_id"] in ("p1", "p3")} == {"r1"}
    assert not list(tmp_path.glob("*.partial"))


def test_one_rank_partial_work_resumed_by_two_ranks_loses_and_repeats_nothing(tmp_path):
    path, units = tmp_path / "s.jsonl", [f"p{i}" for i in range(7)]
    one = ChunkLog(path, by_prompt, need=2)
    one.append(rows_for(["p0", "p1"], tag="one-"))
    one.append(rows_for(["p2", "p3"], tag="one-"))
    r0 = ChunkLog(path, by_prompt, need=2, shard=0, num_shards=2)  # both open before either appends
    r1 = ChunkLog(path, by_prompt, need=2, shard=1, num_shards=2)
    todo0, todo1 = _work_all(r0, units, "r0-"), _work_all(r1, units, "r1-")
    assert todo0 == ["p4", "p6"] and todo1 == ["p5"], "each rank: its own shard, less what rank 0 of 1 did"
    rows = _published(path, units)
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(u, j) for u in units for j in range(2)]
    assert [r["text"].split("-")[0] for r in rows[::2]] == ["one"] * 4 + ["r0", "r1", "r0"]


def test_a_unit_complete_in_two_files_is_kept_once(tmp_path):
    path = tmp_path / "s.jsonl"
    ChunkLog(path, by_prompt, need=2, shard=0, num_shards=2).append(rows_for(["p0"], tag="a-"))
    ChunkLog(path, by_prompt, need=2, shard=1, num_shards=2).append(rows_for(["p0", "p1"], tag="b-"))
    done, metas = ChunkLog(path, by_prompt, need=2).collect()
    assert [r["text"] for r in done["p0"]] == ["a-p0-0", "a-p0-1"] and len(done["p1"]) == 2
    assert len(metas) == 2


def test_chunk_meta_is_collected_per_chunk(tmp_path):
    log = ChunkLog(tmp_path / "j.jsonl", by_prompt)
    log.append(rows_for(["a"], n=1), {"forced": 2})
    log.append(rows_for(["b"], n=1), {"forced": 3})
    assert sum(m["forced"] for m in log.collect()[1]) == 5


def test_map_chunked_keeps_every_rank_in_lockstep(tmp_path, monkeypatch):
    """Another rank has 3 chunks to do, this one 1: this rank calls `work` 3 times (twice with nothing), appends
    once, and starts the engine once; when no rank has work, nothing is called."""
    from train.runtime import distributed as dist

    log = ChunkLog(tmp_path / "s.jsonl", by_prompt, need=2)
    log.append(rows_for(["p0"]))
    log = ChunkLog(tmp_path / "s.jsonl", by_prompt, need=2)
    calls, started = [], []
    monkeypatch.setattr(dist, "gather_rows", lambda rows: rows + [3])

    def work(chunk):
        calls.append(list(chunk))
        return rows_for(chunk), None

    map_chunked(log, ["p0", "p1", "p2"], str, 2, work, start=lambda: started.append(1))
    assert calls == [["p1", "p2"], [], []] and started == [1]
    assert len(lines(log.partial)) == 2
    monkeypatch.setattr(dist, "gather_rows", lambda rows: rows + [0])
    calls.clear()
    map_chunked(ChunkLog(tmp_path / "s.jsonl", by_prompt, need=2), ["p0", "p1", "p2"], str, 2, work,
                start=lambda: started.append(1))  # fmt: skip
    assert calls == [] and started == [1], "a finished phase starts no engine"


# ---------------------------------------------------------------- SIGKILL in a chunk append


CHUNKS = """
    import sys
    from train.runtime.artifacts import ChunkLog
    log = ChunkLog(sys.argv[1] if len(sys.argv) > 1 else {path!r}, lambda row: row["prompt_id"], need=2)
    todo = log.todo({units!r}, str)
    for i in range(0, len(todo), 2):
        chunk = todo[i : i + 2]
        log.append([{{"prompt_id": p, "sample": j, "text": "x" * 20000}} for p in chunk for j in range(2)])
    print("done", len(todo))
"""


def test_sigkill_in_a_chunk_append_then_resume_appends_cleanly(tmp_path):
    """The child is killed halfway through writing its 2nd chunk (a torn line on disk); the next child cuts it,
    redoes exactly those two prompts and the rest, and every line of the partial file is a whole chunk."""
    path, units = tmp_path / "s.jsonl", [f"p{i}" for i in range(6)]
    code = CHUNKS.format(path=str(path), units=units)
    res = child(code, env={"SELFREWARD_FAULT": "chunk_append:s.jsonl@2"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    partial = tmp_path / "s.jsonl.rank0.partial"
    text = partial.read_text()
    assert text.count("\n") == 1 and not text.endswith("\n"), "one whole chunk, then a torn one"
    res = child(code)
    assert res.returncode == 0 and res.stdout.split() == ["done", "4"], res.stderr
    assert all(json.loads(line)["rows"] for line in lines(partial))
    done, _ = ChunkLog(path, by_prompt, need=2).collect()
    assert sorted(done) == units and all(len(r) == 2 for r in done.values())
    assert sum(len(json.loads(line)["rows"]) for line in lines(partial)) == 12, "no unit written twice"


# ---------------------------------------------------------------- metrics before publish


def _run(tmp_path, monkeypatch, algorithm: str = "scpo", **extra):
    from train.config import Recipe
    from train.loop import Run

    monkeypatch.setattr("train.loop.resolve_model", lambda model: str(tmp_path / "model"))
    recipe = Recipe.model_validate({"algorithm": algorithm, "output_dir": str(tmp_path / "out"), **extra})
    return Run(recipe)


def _chunked_fn(run, k: int, units: list[str], calls: list):
    """A generation phase in miniature: ChunkLog + map_chunked + finish, as generate_samples does."""

    def fn():
        log = ChunkLog(run.iter_dir(k) / "samples.jsonl", by_prompt, need=2)

        def work(chunk):
            calls.append(list(chunk))
            return rows_for(chunk), None

        map_chunked(log, units, str, 2, work)
        done, _ = log.collect()
        rows = [row for u in units for row in done[u]]
        log.finish(rows)
        return {"samples": len(rows)}

    return fn


def test_an_artifact_is_published_only_after_its_metrics(tmp_path, monkeypatch):
    """The metrics write fails (as a kill there would stop it): the artifact must not be there for a rerun to
    skip, and its partial work must still be there to resume from."""
    import train.loop

    run = _run(tmp_path, monkeypatch)
    artifact = run.iter_dir(1) / "samples.jsonl"
    real = train.loop.write_json

    def dying(path, obj):
        if Path(path).parent.name == "phases" and Path(path).name == "generate.json":
            raise KeyboardInterrupt("killed while writing the metrics")
        real(path, obj)

    monkeypatch.setattr(train.loop, "write_json", dying)
    calls: list = []
    with pytest.raises(KeyboardInterrupt):
        run.phase(1, "generate", artifact, _chunked_fn(run, 1, ["p0", "p1", "p2"], calls))
    assert not artifact.exists(), "published without its metrics"
    assert (run.iter_dir(1) / "samples.jsonl.rank0.partial").exists()
    monkeypatch.setattr(train.loop, "write_json", real)
    calls.clear()
    run = _run(tmp_path, monkeypatch)
    assert run.phase(1, "generate", artifact, _chunked_fn(run, 1, ["p0", "p1", "p2"], calls)) == {"samples": 6}
    assert calls == [], "the rerun reused every finished chunk"
    assert len(read_jsonl(artifact)) == 6 and not list(artifact.parent.glob("*.partial"))
    assert json.loads((run.iter_dir(1) / "phases" / "generate.json").read_text())["metrics"] == {"samples": 6}
    assert not list(artifact.parent.glob("*.staged.tmp"))


PHASE = """
    import sys
    from pathlib import Path
    from train.config import Recipe
    import train.loop
    from train.runtime.artifacts import ChunkLog, map_chunked
    train.loop.resolve_model = lambda model: "unused"
    run = train.loop.Run(Recipe.model_validate({{"algorithm": "scpo", "output_dir": {out!r}}}))
    units = ["p0", "p1", "p2", "p3"]

    def fn():
        log = ChunkLog(run.iter_dir(1) / "samples.jsonl", lambda row: row["prompt_id"], need=2)

        def work(chunk):
            print("work", *chunk, flush=True)
            return [{{"prompt_id": p, "sample": j}} for p in chunk for j in range(2)], None

        map_chunked(log, units, str, 2, work)
        done, _ = log.collect()
        log.finish([row for u in units for row in done[u]])
        return {{"samples": 8}}

    print(run.phase(1, "generate", run.iter_dir(1) / "samples.jsonl", fn))
"""


@pytest.mark.parametrize("point", ["phase_metrics:generate", "publish:samples.jsonl"])
def test_sigkill_around_the_phase_metrics_write_then_resume(tmp_path, point):
    """Killed before the metrics are written, or after but before the publish: no artifact without metrics, and
    the rerun publishes from the partial file without redoing any chunk."""
    out = tmp_path / "out"
    code = PHASE.format(out=str(out))
    res = child(code, env={"SELFREWARD_FAULT": point})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert res.stdout.count("work") == 2
    it = out / "iter_1"
    assert not (it / "samples.jsonl").exists()
    assert (it / "phases" / "generate.json").exists() == point.startswith("publish")
    assert (it / "samples.jsonl.staged.tmp").exists() and (it / "samples.jsonl.rank0.partial").exists()
    res = child(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "work" not in res.stdout, "finished chunks were redone"
    assert len(read_jsonl(it / "samples.jsonl")) == 8
    assert json.loads((it / "phases" / "generate.json").read_text())["metrics"] == {"samples": 8}
    assert sorted(p.name for p in it.iterdir()) == ["phases", "samples.jsonl"]


def test_staged_publish_replaces_a_directory_and_redirects_only_its_artifact(tmp_path):
    final, other = tmp_path / "adapter", tmp_path / "other.jsonl"
    with Staged(final) as staged:
        tmp = tmp_path / "adapter.tmp"
        tmp.mkdir()
        (tmp / "w").write_text("new")
        commit_dir(tmp, final)
        write_jsonl(other, [{"x": 1}])
        assert not final.exists() and other.exists()
    final.mkdir()
    (final / "old").write_text("x")
    assert staged.publish()
    assert sorted(os.listdir(final)) == ["w"] and not staged.path.exists()
    assert not Staged(tmp_path / "nothing").publish()


# ---------------------------------------------------------------- adapters: fsync before rename, whole or redone


def _safetensors(path: Path) -> int:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"a": np.ones((8, 4), np.float32), "b": np.zeros(16, np.float32)}, str(path))
    return path.stat().st_size


def test_safetensors_complete_detects_every_truncation(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    size = _safetensors(path)
    assert safetensors_complete(path)
    data = path.read_bytes()
    for cut in [0, 4, 8, 20, size // 2, size - 1]:
        path.write_bytes(data[:cut])
        assert not safetensors_complete(path), cut
    path.write_bytes(b"\xff" * 8 + data[8:])  # a header length past the end of the file
    assert not safetensors_complete(path)
    assert not safetensors_complete(tmp_path / "missing.safetensors")


def _adapter(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    _safetensors(path / "adapter_model.safetensors")


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_a_truncated_adapter_is_not_used_and_its_train_phase_is_redone(tmp_path, monkeypatch):
    run = _run(tmp_path, monkeypatch)
    adapter = run.iter_dir(1) / "adapter"
    trained = []

    def train():
        trained.append(1)
        tmp = adapter.with_name("adapter.tmp")
        _adapter(tmp)
        commit_dir(tmp, adapter)
        return {"steps": 1.0}

    run.phase(1, "train", adapter, train)
    assert run.adapter(1) == adapter and adapter_complete(adapter) and artifact_complete(adapter)
    run.phase(1, "train", adapter, train)
    assert trained == [1], "a whole adapter is reused"
    _truncate(adapter / "adapter_model.safetensors")  # what a power loss after an unsynced rename can leave
    assert run.adapter(1) is None, "vLLM would fail to load it on every rerun"
    assert not artifact_complete(adapter)
    run.phase(1, "train", adapter, train)
    assert trained == [1, 1] and run.adapter(1) == adapter
    (adapter / "adapter_config.json").write_text('{"r": ')
    assert run.adapter(1) is None


def test_commit_dir_fsyncs_every_file_before_the_rename(tmp_path, monkeypatch):
    synced, order = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        order.append(set(synced))
        real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "fsync", fsync)
    monkeypatch.setattr(artifacts.os, "replace", replace)
    tmp = tmp_path / "adapter.tmp"
    _adapter(tmp)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "x").write_text("y")
    files = {str(p) for p in tmp.rglob("*") if p.is_file()}
    commit_dir(tmp, tmp_path / "adapter")
    assert len(order) == 1 and files <= order[0], f"not fsync'd before the rename: {files - order[0]}"
    assert str(tmp) in order[0], "nor the directory itself"


COMMIT = """
    import sys
    from pathlib import Path
    from train.runtime.artifacts import commit_dir
    tmp = Path({tmp!r})
    tmp.mkdir()
    (tmp / "adapter_config.json").write_text('{{"r": 8}}')
    (tmp / "adapter_model.safetensors").write_bytes(b"new")
    commit_dir(tmp, Path({final!r}))
"""


def test_sigkill_in_commit_dir_leaves_the_old_directory_or_the_new_whole(tmp_path):
    final, tmp = tmp_path / "adapter", tmp_path / "adapter.tmp"
    _adapter(final)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    code = COMMIT.format(tmp=str(tmp), final=str(final))
    res = child(code, env={"SELFREWARD_FAULT": "commit_dir:adapter"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before and tmp.exists()
    import shutil

    shutil.rmtree(tmp)  # publish_adapter clears its tmp dir first
    assert child(code).returncode == 0
    assert (final / "adapter_model.safetensors").read_bytes() == b"new" and not tmp.exists()
