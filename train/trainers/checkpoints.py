"""Mid-phase resume: the newest TRL checkpoint that is whole (a kill mid-save leaves a torn one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint


def last_complete_checkpoint(ckpt_dir: str | Path) -> str | None:
    """The newest TRL checkpoint that was fully written, or None.

    transformers writes `checkpoint-N/` in place and `trainer_state.json` last; a kill mid-save leaves a torn
    `checkpoint-N` that `get_last_checkpoint` would pick and fail to load. Torn ones are removed.
    """
    while Path(ckpt_dir).is_dir() and (last := get_last_checkpoint(str(ckpt_dir))) is not None:
        try:
            json.loads((Path(last) / "trainer_state.json").read_text())
            return last
        except (OSError, ValueError):
            try:
                shutil.rmtree(last)
            except FileNotFoundError:  # another rank of the same launch removed it first
                pass
    return None
