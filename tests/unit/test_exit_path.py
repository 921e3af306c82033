"""The end of a `selfreward` process (train/cli.py `entry` -> `end_process`): cheap, same exit codes, same files,
atexit hooks run, and nothing printed after the command's own output."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs `entry()` as the console script does, and reports at the very end of the interpreter's exit hooks.
_ENTRY = """
import atexit, sys
atexit.register(lambda: print("atexit ran; torch", "torch" in sys.modules, flush=True))
sys.argv = ["selfreward", *sys.argv[1:]]
from train.cli import entry
entry()
"""


def _entry(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _ENTRY, *args], capture_output=True, text=True, env=env, timeout=120)


def test_entry_keeps_exit_codes_and_files_and_runs_atexit_hooks(tmp_path):
    out = tmp_path / "ref.md"
    ok = _entry("docs", "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert out.read_text().startswith("#"), "the command's file is complete"
    # atexit hooks ran before the process ended, and a command without an engine never imports torch
    assert ok.stdout.strip().splitlines()[-1] == "atexit ran; torch False"
    bad = _entry("report", str(tmp_path / "missing"))
    assert bad.returncode == 2 and bad.stderr.startswith("selfreward: error:")


def test_an_error_after_torch_was_imported_is_the_only_line(tmp_path):
    """`run` validates `trainer:` with TRL, which imports torch and triton; their native modules complained at
    interpreter teardown ("nanobind: leaked ...", 70 lines) when the heap was frozen to make teardown cheap."""
    res = _entry("run", "recipes/scpo/smollm2-135m-cpu.yaml", f"output_dir={tmp_path}/o", "model=/nope/model")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip().splitlines()[0]], res.stderr[-2000:]
    assert res.stderr.startswith("selfreward: error:") and res.stdout.strip() == "atexit ran; torch True"


def test_gc_collect_skipped_only_inside():
    from train.engine.vllm import _gc_collect_skipped

    class Node:
        pass

    gc.collect()
    gc.disable()  # no automatic collection in between
    try:
        with _gc_collect_skipped():
            a = Node()
            a.self = a  # a cycle only the collector frees
            del a
            assert gc.collect() == 0
        assert gc.collect() >= 1, "gc.collect works again after the block"
    finally:
        gc.enable()
