"""Live demonstrations: two spawned processes all-reduce a tensor (notebook 01); the plain DDP
listing run on spawned ranks (notebook 03, and its test); rank 1 of a short run fails in five
ways, and what the user is told (notebook 05)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .. import plain_ddp
from ..config import TrainConfig
from ..dist import job_group
from ..faults import injected
from ..launcher import launch
from ..place import RankPlace
from ..failures import WorkerError
from ..workers import run_workers


def _allreduce_job(place: RankPlace, emit: Callable, values: list[list[float]]) -> None:
    with job_group(place, 30):
        tensor = torch.tensor(values[place.rank])
        before = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        emit("result", {"before": before.tolist(), "after": tensor.tolist()})


def allreduce_demo(values: list[list[float]], timeout_s: float = 120) -> dict[int, dict]:
    """Spawn one gloo rank per row of ``values``; each all-reduces (sums) its row.
    Returns, per rank, the tensor it held before and after the collective."""
    return run_workers(_allreduce_job, len(values), (values,), launch_timeout_s=timeout_s)


FAILURES = {"raise": "raises", "exit": "exits hard", "hang": "hangs", "SIGSTOP": "is frozen", "SIGKILL": "is killed"}


def stopped_at(err: WorkerError) -> str:
    """The innermost frame of the silent rank's main thread, from the stack the launcher put in the
    error's details, as 'file:line function' without the folders; else whether a stack was asked for
    (only a silent rank is asked: an error or an exit says enough)."""
    found = re.search(r'Current thread [^\n]*\n\s*File "(?:[^"]*/)?([^"/]+)", line (\d+) in (\S+)', err.details)
    if found:
        return f"{found.group(1)}:{found.group(2)} {found.group(3)}"
    return "asked for, none came back" if "Python stack of rank" in err.details else "not asked for"


def fail_rank_1(how: str, timeout_s: float) -> dict:
    """A short two-rank run in which rank 1 fails in the way ``how`` names (a key of FAILURES):
    the three injected faults, or a signal sent from outside once rank 1 has taken 10 steps.
    Returns what the user is told: who was blamed, why, how soon, and what was left running."""
    from_outside = how in ("SIGSTOP", "SIGKILL")
    # a signal is sent at rank 1's first progress report (every 0.5 s): on a fast host one epoch can end
    # before it, so the run asks for more epochs than it will live to finish
    cfg = TrainConfig(world_size=2, dataset="synthetic", train_subset=8192, test_subset=256,
                      epochs=50 if from_outside else 1, timeout_s=timeout_s, launch_timeout_s=300)
    began: dict = {}

    def watch(event) -> None:
        if event.kind == "fault":  # an injected fault says when it fired
            began["time"] = event.payload["time"]
        elif from_outside and event.rank == 1 and event.kind == "progress" and event.payload["step"] >= 10 \
                and not began:
            began["time"] = time.time()
            os.kill(event.payload["pid"], getattr(signal, how))

    try:
        with contextlib.nullcontext() if from_outside else injected(rank=1, step=10, kind=how):
            launch(cfg, on_event=watch, live=False)
    except WorkerError as err:
        return {"rank 1 ...": FAILURES[how], "blamed": f"rank {err.rank}", "reported as": err.reason,
                "reported after (s)": f"{err.detected_at - began['time']:.1f}",
                "workers left": sum(os.path.exists(f"/proc/{p}") for p in err.pids),
                "its stack, innermost frame": stopped_at(err)}
    raise RuntimeError(f"rank 1 was to fail ({how}) but the run finished")


def _plain_listing_job(place: RankPlace, emit: Callable, cfg: dict, weights_path: str) -> None:
    plain_ddp.train(cfg, weights_path)  # it reads its place from the variables, as under torchrun


def run_plain_listing(cfg: TrainConfig, timeout_s: float = 300) -> dict[str, torch.Tensor]:
    """The plain listing (``plain_ddp.train``) on ``cfg.world_size`` spawned ranks; rank 0's final weights."""
    values = cfg.to_dict()
    with tempfile.TemporaryDirectory(prefix="plain_ddp_") as folder:
        path = Path(folder) / "weights.pt"
        run_workers(_plain_listing_job, cfg.world_size, ({k: values[k] for k in plain_ddp.DESIGN}, str(path)),
                    launch_timeout_s=timeout_s)
        return torch.load(path, weights_only=True)
