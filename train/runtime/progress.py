"""When to draw progress bars: on a terminal, and never under CI."""

from __future__ import annotations

import os
import sys
from typing import Any


def progress_enabled() -> bool:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    if os.environ.get("SELFREWARD_PROGRESS") == "1":
        return True
    return sys.stderr.isatty()


class ChunkProgress:
    """Progress where long jobs run without a terminal (a SLURM log, `> file`, CI): one log line per finished chunk,
    with done/total, rate and ETA, from rank 0. On a terminal the engines draw their own bars instead."""

    def __init__(self, total: int, desc: str, unit: str = "prompts", min_total: int = 1):
        import time

        from train.runtime import distributed as dist

        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.start = time.perf_counter()
        self.enabled = not progress_enabled() and total >= min_total and dist.is_main()

    def update(self, n: int) -> None:
        import logging
        import time

        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        logging.getLogger("selfreward").info(
            "%s: %d/%d %s (%.0f%%), %.2f/s, ETA %d:%02d", self.desc, self.done, self.total, self.unit,
            100 * self.done / max(self.total, 1), rate, eta // 60, eta % 60,
        )  # fmt: skip


class LogBar:
    """The part of tqdm's interface that vLLM's `LLM.generate(use_tqdm=<callable>)` uses, as ChunkProgress lines: a
    line each time another tenth of the samples is done. Lets vLLM take a whole generation call at once without a
    terminal (chunks of `sampling.batch_size` prompts each ended in a tail of a few long samples, issue 15)."""

    def __init__(self, total: int, desc: str, min_total: int = 1):
        self.n, self.postfix = 0, ""
        self._progress = ChunkProgress(total, desc, unit="samples", min_total=min_total)
        self._step, self._mark = max(1, -(-total // 10)), 0

    @classmethod
    def for_vllm(cls, *iterable: Any, label: str, min_total: int, total: int = 0, **_: Any) -> Any:
        """vLLM calls `use_tqdm` twice: around its list of prompts while adding them (passed through, no line), and
        with `total=` for the generation itself."""
        return iterable[0] if iterable else cls(total, label, min_total)

    @property
    def format_dict(self) -> dict[str, float]:
        import time

        return {"elapsed": max(time.perf_counter() - self._progress.start, 1e-9)}

    def update(self, n: int = 1) -> None:
        self.n += n
        mark = self.n // self._step if self.n < self._progress.total else self._progress.total + 1
        if mark > self._mark:
            self._mark = mark
            self._progress.update(self.n - self._progress.done)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass
