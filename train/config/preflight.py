"""Checks a run needs before it writes anything: the files a recipe names, its model folder, and `output_dir`.

`load_recipe` judges the recipe itself (schema, TRL values, the reward); `preflight` then reads what it points at, so
that a refused run leaves nothing behind: no `output_dir`, no `recipe.json`. Nothing here loads a model, downloads or
converts; the one write is an empty folder made and removed at once to prove `output_dir` writable. The CLI calls it
after `load_recipe` for `run`, `eval` and `validate`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from train.config.schema import Recipe
from train.errors import ConfigError


def preflight(recipe: Recipe, output_dir: bool = True) -> None:
    """Raise ConfigError (one line naming the key, file or line) for the first problem found. `output_dir=False`
    skips the output folder (`selfreward validate`: the run may happen on another machine)."""
    from train.algorithms.sft_seed import check_sft_data
    from train.data import check_arithmetic, check_prompts_per_iteration, load_items
    from train.evaluate import read_labelled_pairs
    from train.models import check_model

    data = recipe.data
    if data.prompts_per_iteration and recipe.score is not None:
        raise ConfigError("data.prompts_per_iteration: SCoRe has no iterations to slice the prompts for; unset it")
    if data.source == "arithmetic":
        check_arithmetic(data)
        pool = min(data.num_train, recipe.max_prompts or data.num_train)
        check_prompts_per_iteration(data, recipe.iterations, pool)  # again after the context filter, in the run
    elif data.source == "jsonl":
        # reads both files: UTF-8, JSON objects, string prompts, unique ids
        train, _ = load_items(data, recipe.seed, recipe.max_prompts)
        check_prompts_per_iteration(data, recipe.iterations, len(train))
    elif not data.hub_id:  # a hub dataset needs the network: checked when the run loads it
        raise ConfigError("data.hub_id: required when data.source is hub")
    if recipe.meta_rewarding is not None and recipe.meta_rewarding.judge_eval_file:
        read_labelled_pairs(recipe.meta_rewarding.judge_eval_file)
    check_sft_data(recipe)  # `sft.ift_file` / `sft.eft_file`, when `sft.enabled`
    check_model(recipe.model)
    if output_dir:
        check_output_dir(recipe.output_dir)


def check_output_dir(value: str) -> None:
    """`output_dir` is a folder, or can be created as one, and the run can write there."""
    try:
        path = Path(value)
        if path.is_symlink() and not path.exists():
            raise ConfigError(f"output_dir: {value} is a broken symbolic link")
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"output_dir: {value} exists and is a file, not a folder")
            _writable(path, f"output_dir: {value} is not writable")
            return
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError(f"output_dir: {value} cannot be created: {ancestor} is a file")
        _writable(ancestor, f"output_dir: {value} cannot be created: {ancestor} is not writable")
    except OSError as e:  # a name too long, a loop of links, an I/O error
        raise ConfigError(f"output_dir: {value}: {e.strerror or e}") from None


def _writable(folder: Path, message: str) -> None:
    """The permission bits, then a folder made and removed at once: root passes any `access` check, and some file
    systems (/proc, a read-only or squashed mount) refuse what the bits allow."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(message)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".selfreward-check-", dir=folder))
    except OSError as e:
        raise ConfigError(f"{message} ({e.strerror or e})") from None
