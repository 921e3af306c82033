"""JSONL artifacts written atomically: a file under its final name is always complete.

Phases read the previous phase's file rather than in-memory state, which is what makes resume free. What keeps a
kill (SIGKILL, OOM killer, preemption) or a power loss from leaving a wrong file behind:
- every file, and every file of a published directory, is fsync'd before the rename that publishes it;
- `Staged`: while a phase runs, the publish of its artifact lands at a staged name, and `Run.phase` moves it under
  its final name only after writing the phase's metrics, so a published artifact always has its metrics;
- `ChunkLog`: a long phase appends each finished chunk to its partial file, and a rerun redoes only what is missing;
- `artifact_complete`: a published adapter counts only when its safetensors file holds every tensor it declares.

Tests kill the process at named points with `SELFREWARD_FAULT` (see `fault`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from train.runtime import distributed as dist

T = TypeVar("T")

# ---------------------------------------------------------------- fault injection (tests)

_FAULT_HITS: Counter[str] = Counter()


def fault(point: str, before: Callable[[], Any] | None = None) -> None:
    """Test hook: SIGKILL this process at `point` when `SELFREWARD_FAULT` names it; a no-op otherwise.

    `SELFREWARD_FAULT` is a comma-separated list of `NAME` or `NAME@N`: the process kills itself the N-th time
    (default: the first) it reaches a point that is NAME or starts with `NAME:`. Points: `chunk_append:<artifact>`
    (after writing half of the chunk), `phase_metrics:<phase>` (before the metrics write), `publish:<artifact>`
    (metrics written, artifact not yet published), `commit_dir:<dir>` (files fsync'd, not yet renamed).
    `before` runs just before the kill (e.g. writes half a chunk)."""
    spec = os.environ.get("SELFREWARD_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        name, _, nth = item.strip().partition("@")
        if point == name or point.startswith(name + ":"):
            _FAULT_HITS[item] += 1
            if _FAULT_HITS[item] == int(nth or 1):
                if before is not None:
                    before()
                os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- atomic files and directories

_STAGED: dict[str, Path] = {}  # absolute final path -> where a publish to it lands while its phase runs


def _target(final: Path) -> Path:
    """Where a publish of `final` lands: its staged name while a `Staged` block for it is open."""
    return _STAGED.get(os.path.abspath(final), final)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync_rename(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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
    _fsync_rename(tmp, _target(path))
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def head_jsonl(path: str | Path, n: int) -> list[dict[str, Any]]:
    """The first `n` rows, without reading the rest of the file."""
    rows: list[dict[str, Any]] = []
    with open(path) as f:
        for line in f:
            if len(rows) >= n:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    _fsync_rename(tmp, _target(path))


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(Path(here))
        for name in files:
            fd = os.open(Path(here) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        _fsync_dir(d)


def commit_dir(tmp_dir: Path, final: Path) -> None:
    """Publish a fully written directory (e.g. a saved adapter) under its final name. Its files are fsync'd before
    the rename: otherwise a power loss soon after could leave the name pointing at truncated files."""
    tmp_dir, final = Path(tmp_dir), Path(final)
    _fsync_tree(tmp_dir)
    fault(f"commit_dir:{final.name}")
    target = _target(final)
    if target.exists():
        shutil.rmtree(target)
    _fsync_rename(tmp_dir, target)


def safetensors_complete(path: Path) -> bool:
    """The file holds its whole header (8-byte little-endian length + JSON) and the bytes of every tensor it
    declares (the largest `data_offsets` end); False for a missing, truncated or garbled file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return bool(ends) and 8 + n + max(ends) <= size
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False


def adapter_complete(path: Path) -> bool:
    """A published PEFT adapter directory that can be loaded: its config parses and its weights are whole."""
    try:
        json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return safetensors_complete(path / "adapter_model.safetensors")


def artifact_complete(path: Path) -> bool:
    """Whether a phase's artifact is there to reuse: a file exists (it only ever appears whole, by rename); a
    directory (an adapter) must be loadable, so one left truncated by a power loss is redone."""
    return adapter_complete(path) if path.is_dir() else path.exists()


class Staged:
    """While the block runs, a publish of `final` (`write_jsonl`, `write_json`, `commit_dir`, `ChunkLog.finish`)
    lands at `final.staged.tmp` instead; `publish()` moves it under its final name afterwards. `Run.phase` writes the
    phase's metrics in between, so a published artifact always has its metrics. A kill in between leaves the
    artifact unpublished: the phase runs again, from its partial files (they are removed only by `publish`)."""

    def __init__(self, final: Path, owner: bool = True):
        self.final = Path(final)
        self.path = self.final.with_name(self.final.name + ".staged.tmp")  # .tmp: never taken for an artifact
        self.owner = owner  # the process that writes (rank 0): it clears a leftover from a killed run

    def __enter__(self) -> Staged:
        if self.owner:
            _remove(self.path)
        _STAGED[os.path.abspath(self.final)] = self.path
        return self

    def __exit__(self, *exc: Any) -> None:
        _STAGED.pop(os.path.abspath(self.final), None)

    def publish(self) -> bool:
        """Move the staged artifact under its final name, then drop the partial files it was made from. False when
        the block staged nothing."""
        if not self.path.exists():
            return False
        fault(f"publish:{self.final.name}")
        if self.final.is_dir():
            shutil.rmtree(self.final)  # a directory is replaced in two steps, as in `commit_dir`
        _fsync_rename(self.path, self.final)
        discard_partials(self.final)
        return True


# ---------------------------------------------------------------- partial work of long phases


def discard_partials(final: Path) -> None:
    """Remove every partial file of the artifact `final` (every rank's)."""
    for path in Path(final).parent.glob(Path(final).name + ".*partial"):
        path.unlink(missing_ok=True)


def _read_chunks(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The whole chunk records of one partial file, up to the first torn or garbled line. With `repair`, the file
    is cut there, so the next append starts on a clean line."""
    chunks, good = [], 0
    try:
        f = open(path, "rb+" if repair else "rb")
    except FileNotFoundError:
        return []
    with f:
        for line in f:
            try:
                chunk = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                chunk = None
            if not isinstance(chunk, dict) or not isinstance(chunk.get("rows"), list):
                break
            chunks.append(chunk)
            good += len(line)
        if repair and f.seek(0, os.SEEK_END) != good:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return chunks


class ChunkLog:
    """Crash-safe partial work of a long phase: finished chunks survive a kill, and a rerun redoes only the rest.

    Units and rows: the phase's work is a list of units (a prompt to sample, a response to judge, a pair of
    judgements to compare); each unit yields exactly `need` rows (e.g. `num_samples` samples per prompt), and
    `key(row)` names the unit a row belongs to.

    Files: writer (rank) r appends to `<artifact>.rank<r>.partial`, one JSON line per chunk,
    `{"rows": [...], "meta": {...}}`, with one `write` call followed by fsync. A kill can tear only the last line: on
    open a writer cuts its own file after its last whole line, so a torn chunk is dropped whole and the next chunk
    starts on a clean line. A unit is done only when one whole chunk holds all `need` of its rows.

    Ranks (the choice for a rank count that changes between runs): on open, every writer reads the partial files of
    ALL ranks, whichever rank count wrote them, and takes as done each unit complete in any of them (the first
    complete occurrence, by rank then line, is the one kept: duplicates are dropped). `todo` then gives writer r only
    the not-done units of its own shard, `units[r::num_shards]`. Shards are disjoint and every writer reads before any
    writes (`map_chunked` meets in a collective first), so resuming 2 ranks' work with 1 rank, or 1 rank's with 2,
    neither loses nor repeats a unit; files of ranks that no longer exist are read, never written. `collect` re-reads
    every file, so rank 0 gathers the other ranks' rows from disk after a barrier. The partial files are removed
    when the artifact is published (`Staged.publish` inside a phase, `finish` outside one); never by other ranks.
    """

    def __init__(
        self,
        path: str | Path,
        key: Callable[[dict[str, Any]], Hashable],
        need: int = 1,
        shard: int = 0,
        num_shards: int = 1,
    ):
        self.final = Path(path)
        self.key, self.need, self.shard, self.num_shards = key, need, shard, num_shards
        self.partial = self.final.with_name(f"{self.final.name}.rank{shard}.partial")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        _read_chunks(self.partial, repair=True)
        self.done: set[Hashable] = set(self.collect()[0])

    def files(self) -> list[Path]:
        """Every rank's partial file of this artifact, in rank order."""
        pattern = re.compile(re.escape(self.final.name) + r"\.rank(\d+)\.partial")
        found = [(m, p) for p in self.final.parent.iterdir() if (m := pattern.fullmatch(p.name))]
        return [p for m, p in sorted(found, key=lambda mp: int(mp[0].group(1)))]

    def _complete(self, rows: list[dict[str, Any]]) -> dict[Hashable, list[dict[str, Any]]]:
        groups: dict[Hashable, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            groups[self.key(row)].append(row)
        return {k: unit for k, unit in groups.items() if len(unit) == self.need}

    def collect(self) -> tuple[dict[Hashable, list[dict[str, Any]]], list[dict[str, Any]]]:
        """The complete units of all ranks' files (key -> its rows, each unit once) and the `meta` of every chunk
        that gave a unit."""
        units: dict[Hashable, list[dict[str, Any]]] = {}
        metas = []
        for path in self.files():
            for chunk in _read_chunks(path):
                new = {k: unit for k, unit in self._complete(chunk["rows"]).items() if k not in units}
                if new:
                    units |= new
                    metas.append(chunk.get("meta") or {})
        return units, metas

    def todo(self, units: list[T], unit_key: Callable[[T], Hashable]) -> list[T]:
        """This writer's shard of `units`, less the units done by any rank."""
        return [u for i, u in enumerate(units) if i % self.num_shards == self.shard and unit_key(u) not in self.done]

    def append(self, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
        """Append one finished chunk whole: one `write` call, then fsync."""
        data = (json.dumps({"rows": rows, "meta": meta or {}}, ensure_ascii=False) + "\n").encode()
        created = not self.partial.exists()
        fd = os.open(self.partial, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fault(
                f"chunk_append:{self.final.name}", before=lambda: (os.write(fd, data[: len(data) // 2]), os.fsync(fd))
            )
            view = memoryview(data)
            while view:  # a regular file takes it in one call; the loop only guards against a short write
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.partial.parent)
        self.done |= set(self._complete(rows))

    def finish_in_order(self, keys: list[Hashable]) -> list[dict[str, Any]]:
        """Publish every unit's rows in `keys` order (rank 0, after all ranks' chunks are written); returns them."""
        done, _ = self.collect()
        rows = [row for key in keys for row in done[key]]
        self.finish(rows)
        return rows

    def finish(self, rows: list[dict[str, Any]]) -> None:
        """Publish the artifact (rank 0). Inside a phase the publish is staged, and the partial files stay until
        `Run.phase` has written the metrics and published; outside one, they go now."""
        write_jsonl(self.final, rows)
        if _target(self.final) == self.final:
            self.discard()

    def discard(self) -> None:
        discard_partials(self.final)


def map_chunked(
    log: ChunkLog,
    units: list[T],
    unit_key: Callable[[T], Hashable],
    batch_size: int,
    work: Callable[[list[T]], tuple[list[dict[str, Any]], dict[str, Any] | None]],
    start: Callable[[], Any] | None = None,
) -> None:
    """Data-parallel, crash-safe: `work` over this rank's not-done units, `batch_size` at a time, appending each
    finished chunk (its rows, and a `meta` dict summed into metrics) to `log`. Every rank calls `work` the same
    number of times, with an empty chunk once its own are done, so engines stay in lockstep; `start` (e.g. loading
    the adapter) runs on every rank before the first chunk, and not at all when no rank has work. Returns on every
    rank once all ranks' chunks are on disk (rank 0 then reads them with `log.collect()`)."""
    todo = log.todo(units, unit_key)
    rounds = max(dist.gather_rows([-(-len(todo) // batch_size)]))  # collective: nobody appends before all have read
    if rounds and start is not None:
        start()
    for i in range(rounds):
        chunk = todo[i * batch_size : (i + 1) * batch_size]
        rows, meta = work(chunk)
        if chunk:
            log.append(rows, meta)
    dist.barrier()
