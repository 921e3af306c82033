"""wandb: one run per `selfreward run` (resumed runs continue it), config, per-iteration metrics, samples.

Secrets stay in the environment: only the recipe (which holds none) is sent as config.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from train.config import Recipe, recipe_to_dict


class Tracker:
    def __init__(self, recipe: Recipe):
        import wandb

        out = Path(recipe.output_dir)
        id_file = out / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(
            project=recipe.logging.project,
            name=recipe.logging.run_name or out.name,
            id=run_id,
            resume="allow",
            dir=str(out),
            mode=recipe.logging.wandb,
            config=recipe_to_dict(recipe),
        )
        self.max_rows = recipe.logging.log_samples

    def log_iteration(self, row: dict[str, Any]) -> None:
        flat = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log({f"iter/{k}": v for k, v in flat.items()})

    def log_samples(self, name: str, rows: list[dict[str, Any]]) -> None:
        rows = rows[: self.max_rows]
        if not rows:
            return
        cols = [c for c in rows[0] if isinstance(rows[0][c], (str, int, float, type(None)))]
        table = self.wandb.Table(columns=cols, data=[[str(r.get(c)) for c in cols] for r in rows])
        self.run.log({name: table})

    def finish(self) -> None:
        self.run.finish()
