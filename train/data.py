"""Prompt sources: synthetic arithmetic (offline, seeded), local JSONL, or a hub dataset.

Every source yields rows `{"id", "prompt", "answer"}`; `conversation` turns one into chat messages.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from train.config import ConfigError, DataConfig

Item = dict[str, Any]


def check_arithmetic(cfg: DataConfig) -> None:
    """Enough distinct questions for both splits (checked before the run starts, without enumerating them)."""
    distinct = len(cfg.operators) * (cfg.max_a + 1) * (cfg.max_b + 1)
    if cfg.num_train + cfg.num_eval > distinct:
        raise ConfigError(
            f"data.num_train + data.num_eval = {cfg.num_train + cfg.num_eval} exceeds the {distinct} "
            "distinct arithmetic questions; raise data.max_a/max_b or lower the counts"
        )


def arithmetic_splits(cfg: DataConfig, seed: int) -> tuple[list[Item], list[Item]]:
    """Disjoint train/eval sets of `a op b` questions, fixed by the seed."""
    check_arithmetic(cfg)
    combos = [(a, b, op) for op in cfg.operators for a in range(cfg.max_a + 1) for b in range(cfg.max_b + 1)]
    random.Random(seed).shuffle(combos)

    def item(i: int, a: int, b: int, op: str) -> Item:
        value = a + b if op == "+" else a - b
        return {"id": f"arith-{i}", "prompt": f"What is {a} {op} {b}?", "answer": str(value)}

    rows = [item(i, *c) for i, c in enumerate(combos[: cfg.num_train + cfg.num_eval])]
    return rows[cfg.num_eval :], rows[: cfg.num_eval]


def jsonl_objects(path: str | Path, what: str = "data file") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a UTF-8 JSONL file; anything else names the file and line."""
    p = Path(path)
    try:
        if p.is_dir():
            raise ConfigError(f"{path}: a folder, not a {what}")
        if not p.is_file():
            raise ConfigError(f"{what} not found: {path}")
        data = p.read_bytes()
    except (OSError, ValueError) as e:  # unreadable (permissions, I/O), or a path the OS refuses
        raise ConfigError(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    rows = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            ) from None
        if n == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise ConfigError(f"{path}:{n}: invalid JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{n}: each line must be a JSON object")
        rows.append((n, row))
    return rows


def read_prompt_file(path: str, cfg: DataConfig, need_answer: bool) -> list[Item]:
    """Read a JSONL of prompts; a missing or mistyped field, or an id used twice, names the file, row and field.
    Ids are the rows' `id` (as text) or `<file stem>-<line>`: votes, pairs and resume are keyed by them."""
    rows, first_line = [], {}
    for n, row in jsonl_objects(path):
        prompt = row.get(cfg.prompt_field)
        if prompt is None:
            raise ConfigError(f"{path}:{n}: missing field `{cfg.prompt_field}`")
        if not isinstance(prompt, str):
            raise ConfigError(f"{path}:{n}: field `{cfg.prompt_field}` must be a string, not {type(prompt).__name__}")
        if not prompt.strip():
            raise ConfigError(f"{path}:{n}: field `{cfg.prompt_field}` is empty")
        answer = row.get(cfg.answer_field)
        if need_answer and answer is None:
            raise ConfigError(f"{path}:{n}: missing field `{cfg.answer_field}`")
        item_id = str(row.get("id", f"{Path(path).stem}-{n}"))
        if item_id in first_line:
            raise ConfigError(f"{path}:{n}: duplicate id `{item_id}` (first on line {first_line[item_id]})")
        first_line[item_id] = n
        rows.append({"id": item_id, "prompt": prompt, "answer": answer})
    if not rows:
        raise ConfigError(f"{path}: no prompts")
    return rows


def _hub_split(cfg: DataConfig, split: str) -> list[Item]:
    try:
        from datasets import load_dataset

        ds = load_dataset(cfg.hub_id, cfg.hub_subset, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all user-fixable
        raise ConfigError(f"data.hub_id={cfg.hub_id} split={split}: could not load ({type(e).__name__}: {e})") from None
    for field in (cfg.prompt_field,):
        if field not in ds.column_names:
            raise ConfigError(f"data.prompt_field: `{field}` is not a column of {cfg.hub_id} ({ds.column_names})")
    return [
        {"id": f"{split}-{i}", "prompt": row[cfg.prompt_field], "answer": row.get(cfg.answer_field)}
        for i, row in keep_matching(ds, cfg.hub_filter, ds.column_names)
    ]


def keep_matching(rows: Any, hub_filter: dict[str, Any], columns: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """(index in the split, row) for the rows whose columns equal `hub_filter`; the index keeps ids stable."""
    unknown = sorted(set(hub_filter) - set(columns))
    if unknown:
        raise ConfigError(f"data.hub_filter: `{unknown[0]}` is not a column ({columns})")
    return [(i, row) for i, row in enumerate(rows) if all(row.get(k) == v for k, v in hub_filter.items())]


def load_items(cfg: DataConfig, seed: int, max_prompts: int | None = None) -> tuple[list[Item], list[Item]]:
    """(train, eval) rows; `max_prompts` caps training prompts, `eval_limit` evaluation ones."""
    if cfg.source == "arithmetic":
        train, evals = arithmetic_splits(cfg, seed)
    elif cfg.source == "jsonl":
        if not cfg.train_file:
            raise ConfigError("data.train_file: required when data.source is jsonl")
        train = read_prompt_file(cfg.train_file, cfg, need_answer=False)
        evals = read_prompt_file(cfg.eval_file, cfg, need_answer=True) if cfg.eval_file else []
    else:
        if not cfg.hub_id:
            raise ConfigError("data.hub_id: required when data.source is hub")
        train, evals = _hub_split(cfg, cfg.train_split), _hub_split(cfg, cfg.eval_split)
    if max_prompts:
        train = train[:max_prompts]
    if cfg.eval_limit:
        evals = evals[: cfg.eval_limit]
    return train, evals


def check_prompts_per_iteration(cfg: DataConfig, iterations: int, pool: int) -> None:
    """Enough training prompts for `iterations` disjoint slices of `data.prompts_per_iteration` (0/None: no slicing)."""
    per = cfg.prompts_per_iteration
    if per and per * iterations > pool:
        raise ConfigError(
            f"data.prompts_per_iteration={per} x iterations={iterations} needs {per * iterations} training prompts, "
            f"but there are {pool}; lower data.prompts_per_iteration or iterations, or add prompts"
        )


def iteration_items(pool: list[Item], cfg: DataConfig, k: int, iterations: int, seed: int) -> list[Item]:
    """The seed prompts iteration k trains on: with `data.prompts_per_iteration` = P, slice k of a seeded shuffle of
    the pool (items (k-1)·P .. k·P-1), so no iteration sees a prompt an earlier one trained on; else the whole pool.

    Why: both papers train each iteration on prompts the model has not trained on. Self-Rewarding (Yuan et al. 2024,
    arXiv 2401.10020, §2.3, §3.2) creates new prompts for each of M1 → M2 → M3 (AIFT(M1), AIFT(M2)); ScPO (Prasad et
    al. 2024, arXiv 2411.04109, §2-3) trains each iteration on problems the current model writes, "unsupervised new
    problems". A disjoint slice of a fixed seed pool is the seed-data form of that. Reading taken: the slices are drawn
    without replacement from one shuffle fixed by `seed`, so a rerun (and every rank) gets the same slices and adding
    an iteration never changes earlier ones."""
    per = cfg.prompts_per_iteration
    if not per:
        return pool
    check_prompts_per_iteration(cfg, iterations, len(pool))
    order = list(range(len(pool)))
    random.Random(f"prompts_per_iteration-{seed}").shuffle(order)  # its own stream: not the arithmetic split's
    return [pool[i] for i in order[(k - 1) * per : k * per]]


def conversation(item: Item, cfg: DataConfig) -> list[dict[str, str]]:
    content = item["prompt"] + (f"\n{cfg.instruction}" if cfg.instruction else "")
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return messages + [{"role": "user", "content": content}]
