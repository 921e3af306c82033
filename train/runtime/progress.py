"""When to draw progress bars: on a terminal, and never under CI."""

from __future__ import annotations

import os
import sys


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
