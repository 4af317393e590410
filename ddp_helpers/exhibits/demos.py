"""A live demonstration for notebook 01: two spawned processes all-reduce a tensor."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ..dist import process_group, tcp_store
from ..workers import run_workers


def _allreduce_job(rank: int, world_size: int, init_method: str, emit: Callable, values: list[list[float]]) -> None:
    with process_group(rank, world_size, tcp_store(init_method, rank, world_size, 30), timeout_s=30):
        tensor = torch.tensor(values[rank])
        before = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        emit("result", {"before": before.tolist(), "after": tensor.tolist()})


def allreduce_demo(values: list[list[float]], timeout_s: float = 120) -> dict[int, dict]:
    """Spawn one gloo rank per row of ``values``; each all-reduces (sums) its row.
    Returns, per rank, the tensor it held before and after the collective."""
    return run_workers(_allreduce_job, len(values), (values,), launch_timeout_s=timeout_s)
