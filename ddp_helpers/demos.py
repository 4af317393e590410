"""Small live demonstrations for the notebooks: spawned jobs that show one idea each."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .config import TrainConfig
from .dist import process_group
from .launch import run_workers


def _allreduce_job(rank: int, world_size: int, init_method: str, emit: Callable, values: list[list[float]]) -> None:
    with process_group(TrainConfig(world_size=world_size, timeout_s=30), rank, world_size, rank, init_method):
        tensor = torch.tensor(values[rank])
        before = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        emit("result", {"before": before.tolist(), "after": tensor.tolist()})


def allreduce_demo(values: list[list[float]], timeout_s: float = 120) -> dict[int, dict]:
    """Spawn one gloo rank per row of ``values``; each all-reduces (sums) its row.

    Returns, per rank, the tensor it held before and after the collective.
    """
    return run_workers(_allreduce_job, len(values), (values,), launch_timeout_s=timeout_s)
