"""Inside a data-parallel step (notebook 03): the from-scratch DDP (``sync/bucketed.py``) run on two
spawned ranks, each recording when every gradient was ready, when each bucket's all-reduce started
and ended, how long the rank waited and when the optimizer stepped; and a chart of one step per
transport, both ranks on one clock (``time.perf_counter`` is the machine's monotonic clock).
"""

from __future__ import annotations

import statistics
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd
import torch

from ..data import batches, load_datasets, train_indices
from ..dist import job_store, process_group
from ..engine import Tally, make_optimizer, step
from ..model import MLP
from ..place import RankPlace
from ..sync import BucketedDataParallel
from ..transport import name_of, open_transport
from ..workers import run_workers
from .colours import PHASE_COLOURS


def _timeline_job(place: RankPlace, emit: Callable, comm: str, bucket_cap_mb: float, warmup: int,
                  steps: int) -> None:
    torch.set_num_threads(1)
    store = job_store(place, 60)
    with process_group(place.rank, place.world_size, store, timeout_s=60) as ctx:
        transport = open_transport(comm, store, place.rank, [0] * place.world_size, "gloo", ctx.device, 60)
        train, _ = load_datasets("mnist", "", 32 * place.world_size * (warmup + steps), 1, 0)
        torch.manual_seed(0)
        model = MLP()
        optimizer, _ = make_optimizer(model.parameters(), 1e-3, 1e-5)
        marks: list = []
        sync = BucketedDataParallel(model, optimizer, transport, bucket_cap_mb, timeline=marks)
        tally, indices = Tally(ctx.device), train_indices(len(train), place.rank, place.world_size, 0, 0)
        for i, (x, y) in enumerate(batches(train, indices, 32)):
            if i == warmup:
                marks.clear()
            step(sync, optimizer, x, y, tally)
        transport.close()
        emit("result", {"marks": marks, "buckets_bytes": sync.bucket_sizes, "comm": sync.comm})


def record_timelines(comms=("gloo", "shm"), bucket_cap_mb: float = 0.25, warmup: int = 30, steps: int = 20,
                     timeout_s: float = 300) -> dict:
    """For each transport: both ranks' marks over ``steps`` steps after ``warmup``."""
    return {comm: run_workers(_timeline_job, 2, (comm, bucket_cap_mb, warmup, steps), launch_timeout_s=timeout_s)
            for comm in comms}


def steps_of(marks: list) -> list[list]:
    """A rank's marks cut into steps (each begins at its zero_grad)."""
    out: list[list] = []
    for mark in marks:
        if mark[0] == "zero_grad":
            out.append([])
        if out:
            out[-1].append(mark)
    return [s for s in out if any(m[0] == "step" for m in s)]


def phases(step_marks: list, origin: float) -> dict:
    """One step of one rank, in ms from ``origin``: forward and backward, each bucket's all-reduce,
    the wait, the optimizer; and each gradient's moment."""
    t = {m[0]: m for m in step_marks}
    grads = [(m[1], 1000 * (m[2] - origin)) for m in step_marks if m[0] == "gradient"]
    reduces = [(m[1], 1000 * (m[2] - origin), 1000 * (m[3] - origin)) for m in step_marks if m[0] == "all-reduce"]
    start, wait, done = (1000 * (t[k][2] - origin) for k in ("zero_grad", "wait", "step"))
    wait_end = 1000 * (t["wait"][3] - origin)
    return {"compute": (start, max(g for _, g in grads)), "gradients": grads, "all-reduce": reduces,
            "wait": (wait, wait_end), "optimizer": (wait_end, done)}


def typical_step(run: dict) -> tuple[dict, dict]:
    """The step (the same index on both ranks) whose slower rank's duration is the median; each
    rank's phases from that step's earliest start."""
    per_rank = [steps_of(run[r]["marks"]) for r in sorted(run)]
    count = min(len(s) for s in per_rank)
    span = [max(s[i][-1][2] - s[i][0][2] for s in per_rank) for i in range(count)]
    i = span.index(statistics.median_low(span))
    origin = min(s[i][0][2] for s in per_rank)
    return {r: phases(s[i], origin) for r, s in zip(sorted(run), per_rank)}, {"step_ms": 1000 * span[i]}


def plot_timelines(timelines: dict) -> plt.Figure:
    """One panel per transport: each rank's lane, one typical step."""
    fig, axes = plt.subplots(len(timelines), 1, figsize=(9, 1.6 + 1.25 * len(timelines)), sharex=True)
    colours = {"compute": PHASE_COLOURS["compute"], "all-reduce": PHASE_COLOURS["sync"], "wait": PHASE_COLOURS["wait"],
               "optimizer": PHASE_COLOURS["optimizer"]}  # the same colours as the phase bars
    for ax, (comm, run) in zip(list(axes) if len(timelines) > 1 else [axes], timelines.items()):
        ranks, info = typical_step(run)
        for lane, (rank, p) in enumerate(ranks.items()):
            y = len(ranks) - 1 - lane
            ax.barh(y, p["compute"][1] - p["compute"][0], left=p["compute"][0], height=0.5, color=colours["compute"])
            for _, at in p["gradients"]:
                ax.plot([at, at], [y - 0.3, y + 0.3], color="black", lw=0.8)
            for name, a, b in p["all-reduce"]:
                ax.barh(y - 0.34, b - a, left=a, height=0.16, color=colours["all-reduce"])
            for what in ("wait", "optimizer"):
                a, b = p[what]
                ax.barh(y, b - a, left=a, height=0.5, color=colours[what], hatch="////" if what == "wait" else None,
                        edgecolor=colours["all-reduce"] if what == "wait" else None, lw=0)
        ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in reversed(list(ranks))])
        ax.set_title(f"{run[0]['comm']}: a step of {info['step_ms']:.1f} ms (the median step of both ranks), "
                     f"{len(run[0]['buckets_bytes'])} buckets", fontsize=9, loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor=colours["all-reduce"] if name == "wait" else c,
                             hatch="////" if name == "wait" else None, lw=0) for name, c in colours.items()]
    labels = ["forward + backward (ticks: a gradient ready)", "a bucket's all-reduce (sync)",
              "waiting for the all-reduces (sync)", "optimizer"]
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    axes_list = list(axes) if len(timelines) > 1 else [axes]
    axes_list[-1].set_xlabel("milliseconds from the start of the step")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def timeline_table(timelines: dict) -> pd.DataFrame:
    """Per transport and rank, the typical step's parts in ms: 'start' and '1st AR at' are moments, in ms
    from the earlier rank's start; the others durations. 'gap' runs from the last gradient to the start
    of the wait (backward's end and the last bucket's launch); 'step' is the span over both ranks."""
    rows = []
    for comm, run in timelines.items():
        ranks, info = typical_step(run)
        for rank, p in ranks.items():
            reduces = p["all-reduce"]
            rows.append({"transport": name_of(run[0]["comm"]), "rank": rank,
                         "start": p["compute"][0], "fwd+bwd": p["compute"][1] - p["compute"][0],
                         "1st AR at": min(a for _, a, _ in reduces), "AR busy": sum(b - a for _, a, b in reduces),
                         "gap": p["wait"][0] - p["compute"][1], "wait": p["wait"][1] - p["wait"][0],
                         "optimizer": p["optimizer"][1] - p["optimizer"][0], "step": info["step_ms"]})
    table = pd.DataFrame(rows).set_index(["transport", "rank"]).round(2)
    table.columns.name = "ms"
    return table
