"""Without a terminal (a SLURM log, `> file`, CI) long generation calls log a line per chunk: done/total, rate, ETA."""

from __future__ import annotations

import logging

from tests.conftest import require
from train.config import SamplingConfig
from train.engine import GenParams, HFSampler


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_hf_engine_logs_each_chunk_without_a_terminal(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("CI", "true")  # progress bars off, as under CI or in a batch job's log
    handler, log = _Lines(), logging.getLogger("selfreward")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)  # not `log.level = ...`: that keeps the logger's cached "INFO is off" from earlier calls
    try:
        sampler = HFSampler(tiny_model_dir, SamplingConfig(engine="hf", batch_size=2), seed=0)
        convs = [[{"role": "user", "content": f"{a} + 1 ="}] for a in range(5)]
        out = sampler.generate(convs, GenParams(n=1, temperature=0.0, max_tokens=2), desc="eval greedy")
        small = sampler.generate(convs[:2], GenParams(n=1, temperature=0.0, max_tokens=2), desc="one chunk")
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert len(out) == 5 and len(small) == 2
    chunks = [line for line in handler.lines if line.startswith("eval greedy: ")]
    assert [line.split(" prompts")[0] for line in chunks] == [
        "eval greedy: 2/5",
        "eval greedy: 4/5",
        "eval greedy: 5/5",
    ]
    assert all("/s, ETA " in line for line in chunks) and chunks[-1].endswith("ETA 0:00")
    assert not [line for line in handler.lines if line.startswith("one chunk")], "a single chunk needs no progress"


def test_vllm_engine_takes_the_whole_call_and_logs_tenths_without_a_terminal(tiny_model_dir, monkeypatch):
    """One engine call for all prompts (no per-chunk tail), progress as log lines at every tenth of the samples."""
    require("vllm")
    from train.engine import VLLMSampler

    monkeypatch.setenv("CI", "true")
    handler, log = _Lines(), logging.getLogger("selfreward")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)  # not `log.level = ...`: that keeps the logger's cached "INFO is off" from earlier calls
    try:
        sampler = VLLMSampler(tiny_model_dir, SamplingConfig(max_model_len=128, kv_cache_gib=0.1, batch_size=2), 8, 0)
        calls = []
        generate = sampler.llm.generate
        sampler.llm.generate = lambda prompts, *a, **k: calls.append(len(prompts)) or generate(prompts, *a, **k)
        convs = [[{"role": "user", "content": f"{a} + 1 ="}] for a in range(25)]
        out = sampler.generate(convs, GenParams(n=4, temperature=1.0, max_tokens=3), desc="sample")
        sampler.generate(convs[:2], GenParams(n=4, temperature=1.0, max_tokens=3), desc="small")
        sampler.close()
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert calls == [25, 2] and [len(o) for o in out] == [4] * 25
    lines = [line.split(" samples")[0] for line in handler.lines if line.startswith("sample: ")]
    done = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert lines[-1] == "sample: 100/100" and 5 <= len(lines) <= 11, lines
    tenths = [d // 10 for d in done]
    assert tenths == sorted(set(tenths)), f"one line per tenth crossed: {done}"
    assert not [line for line in handler.lines if line.startswith("small")], "a call of at most batch_size prompts"
