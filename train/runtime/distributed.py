"""Data-parallel helpers for `accelerate launch`: each rank samples its shard, rank 0 writes artifacts.

With one process (no WORLD_SIZE in the environment) every helper is a no-op, so single-process
runs never initialise torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")
U = TypeVar("U")
_TIMEOUT_S: float | None = None  # recipe `distributed_timeout_s`, set by `configure` before the group exists


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def configure(timeout_s: float) -> None:
    """Set the collective timeout before the process group exists (the first `rank()` creates it).

    The group is created here, before TRL's Accelerator, so TRL's `ddp_timeout` never reaches it: without this,
    NCCL and DeepSpeed keep torch's 10-minute default, and ranks waiting while rank 0 works alone get killed."""
    global _TIMEOUT_S
    if _state.cache_info().currsize and timeout_s != _TIMEOUT_S:
        raise RuntimeError("distributed.configure must run before the process group is created")
    _TIMEOUT_S = timeout_s


def share_cpu_threads() -> int | None:
    """On a CPU launch of several ranks on one machine, give each rank its share of the cores for torch (trainer and
    in-process vLLM engine alike); torch's default is every core per rank, so N ranks oversubscribe the machine
    N-fold. An explicit OMP_NUM_THREADS wins; one process keeps torch's default. Returns the count set, or None."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // local)
    torch.set_num_threads(threads)
    return threads


@cache
def _state():
    import datetime

    import torch
    from accelerate import PartialState

    # The same singleton TRL's Trainer joins later. Without cpu=True a CPU launch stays single-process
    # (DistributedType.NO, every rank thinks it is rank 0). Extra kwargs reach init_process_group (or
    # deepspeed.init_distributed), the one place the group's timeout can be set.
    kwargs = {"timeout": datetime.timedelta(seconds=_TIMEOUT_S)} if _TIMEOUT_S else {}
    return PartialState(cpu=not torch.cuda.is_available(), **kwargs)


def timeout_s() -> float | None:
    """The configured collective timeout (None = torch's default)."""
    return _TIMEOUT_S


def rank() -> int:
    return _state().process_index if world_size() > 1 else 0


def local_rank() -> int:
    return _state().local_process_index if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        _state().wait_for_everyone()


def shard(items: list[T]) -> list[T]:
    """This rank's slice, strided so every rank gets a similar mix."""
    return items[rank() :: world_size()]


def gather_rows(rows: list[Any]) -> list[Any]:
    """Every rank's rows, concatenated in rank order, on every rank."""
    if world_size() == 1:
        return rows
    from accelerate.utils import gather_object

    return gather_object(rows)  # all_gather_object, flattened in rank order


def map_sharded(fn: Callable[[list[T]], list[U]], items: list[T]) -> list[U]:
    """`fn` over this rank's shard on every rank (data-parallel sampling); all results, in `items` order, on
    every rank. `fn` must return one result per item."""
    if world_size() == 1:
        return fn(items)
    mine = fn(shard(items))
    assert len(mine) == len(shard(items)), "map_sharded: fn must return one result per item"
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(gather_rows([mine])):  # one list per rank, in rank order
        out[r :: world_size()] = part
    return out


def broadcast(obj: T) -> T:
    """Rank 0's value on every rank."""
    if world_size() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def shutdown() -> None:
    """Leave the process group before exit (local, not collective). A gloo rank that exits with it still up was
    seen to abort in C++ teardown ("terminate called without an active exception", SIGABRT)."""
    import torch.distributed

    # vLLM's external-launcher engine destroys the default group itself when it shuts down.
    if world_size() > 1 and _state.cache_info().currsize and torch.distributed.is_initialized():
        _state().destroy_process_group()


def describe(accelerator: Any) -> str:
    """Which engine a trainer really runs on, for the log: e.g. "2 processes, DEEPSPEED ZeRO-3 on cpu". A config
    that silently fell back (ACCELERATE_USE_CPU=true turns DeepSpeed off) shows here."""
    plugin = accelerator.state.deepspeed_plugin
    stage = f" ZeRO-{plugin.zero_stage}" if plugin is not None else ""
    n, device = accelerator.num_processes, accelerator.device.type
    if n == 1 and plugin is None:
        return f"1 process on {device}"
    return f"{n} process{'es' if n > 1 else ''}, {accelerator.distributed_type.value}{stage} on {device}"
