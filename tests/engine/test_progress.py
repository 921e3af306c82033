"""Without a terminal (a SLURM log, `> file`, CI) long generation calls log a line per chunk: done/total, rate, ETA."""

from __future__ import annotations

import logging

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
    old_level, log.level = log.level, logging.INFO
    try:
        sampler = HFSampler(tiny_model_dir, SamplingConfig(engine="hf", batch_size=2), seed=0)
        convs = [[{"role": "user", "content": f"{a} + 1 ="}] for a in range(5)]
        out = sampler.generate(convs, GenParams(n=1, temperature=0.0, max_tokens=2), desc="eval greedy")
        small = sampler.generate(convs[:2], GenParams(n=1, temperature=0.0, max_tokens=2), desc="one chunk")
    finally:
        log.removeHandler(handler)
        log.level = old_level
    assert len(out) == 5 and len(small) == 2
    chunks = [line for line in handler.lines if line.startswith("eval greedy: ")]
    assert [line.split(" prompts")[0] for line in chunks] == [
        "eval greedy: 2/5",
        "eval greedy: 4/5",
        "eval greedy: 5/5",
    ]
    assert all("/s, ETA " in line for line in chunks) and chunks[-1].endswith("ETA 0:00")
    assert not [line for line in handler.lines if line.startswith("one chunk")], "a single chunk needs no progress"
