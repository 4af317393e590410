"""Live demonstrations: two spawned processes all-reduce a tensor (notebook 01); rank 1 of a
short run fails in five ways, and what the user is told (notebook 05)."""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..dist import process_group, tcp_store
from ..launch import launch
from ..workers import WorkerError, run_workers


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


FAILURES = {"raise": "raises", "exit": "exits hard", "hang": "hangs", "SIGSTOP": "is frozen", "SIGKILL": "is killed"}


def fail_rank_1(how: str, timeout_s: float) -> dict:
    """A short two-rank run in which rank 1 fails in the way ``how`` names (a key of FAILURES):
    the three injected faults, or a signal sent from outside once rank 1 has taken 10 steps.
    Returns what the user is told: who was blamed, why, how soon, and what was left running."""
    cfg = TrainConfig(world_size=2, dataset="synthetic", train_subset=8192, test_subset=256, epochs=1,
                      timeout_s=timeout_s, launch_timeout_s=300)
    from_outside = how in ("SIGSTOP", "SIGKILL")
    if not from_outside:
        cfg = cfg.replace(fail_rank=1, fail_step=10, fail_kind=how)
    began: dict = {}

    def watch(event) -> None:
        if event.kind == "fault":  # an injected fault says when it fired
            began["time"] = event.payload["time"]
        elif from_outside and event.rank == 1 and event.kind == "progress" and event.payload["step"] >= 10 \
                and not began:
            began["time"] = time.time()
            os.kill(event.payload["pid"], getattr(signal, how))

    try:
        launch(cfg, on_event=watch, live=False)
    except WorkerError as err:
        return {"rank 1 ...": FAILURES[how], "blamed": f"rank {err.rank}", "reported as": err.reason,
                "reported after (s)": round(err.detected_at - began["time"], 1),
                "workers left": sum(os.path.exists(f"/proc/{p}") for p in err.pids),
                "stack shown": "Python stack of rank" in str(err)}
    raise RuntimeError(f"rank 1 was to fail ({how}) but the run finished")
