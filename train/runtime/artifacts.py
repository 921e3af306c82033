"""JSONL artifacts written atomically: a file under its final name is always complete.

Phases read the previous phase's file rather than in-memory state, which is what makes resume free.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _fsync_rename(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows to `path.tmp`, fsync, then rename; returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    _fsync_rename(tmp, path)
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    _fsync_rename(tmp, path)


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def commit_dir(tmp_dir: Path, final: Path) -> None:
    """Publish a fully written directory (e.g. a saved adapter) under its final name."""
    if final.exists():
        shutil.rmtree(final)
    _fsync_rename(tmp_dir, final)


class ChunkLog:
    """Append-only JSONL for long phases: finished chunks survive a crash; `finish` publishes.

    The `.partial` file is never read as a finished artifact; on resume its rows are reused.
    """

    def __init__(self, path: str | Path, shard: int | None = None):
        self.final = Path(path)
        suffix = ".partial" if shard is None else f".rank{shard}.partial"  # one file per data-parallel rank
        self.partial = self.final.with_name(self.final.name + suffix)
        self.final.parent.mkdir(parents=True, exist_ok=True)

    def done_rows(self) -> list[dict[str, Any]]:
        if not self.partial.exists():
            return []
        rows = []
        with open(self.partial) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a kill mid-write
        return rows

    def append(self, rows: list[dict[str, Any]]) -> None:
        with open(self.partial, "a") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, rows: list[dict[str, Any]]) -> None:
        write_jsonl(self.final, rows)
        self.discard()

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)
