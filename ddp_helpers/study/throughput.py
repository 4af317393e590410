"""Step time and its split for every strategy, the compute floors, and the original design's
implementation, measured in interleaved rounds (every case once per round, so that a drift
of the host hits all alike; the order rotated from round to round, so that none always runs first). Every case: ``warmup`` steps, then the mean over ``steps``
timed steps (our loop: one epoch of each, cut at ``steps``, so fewer where an epoch is shorter; each
case records its own counts); the median round. Epoch times are that step time x steps per epoch."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

from ..config import TrainConfig
from ..data import TRAIN_SAMPLES, ensure_mnist, steps_per_epoch
from ..launcher import launch
from ..workers import run_workers
from .floors import compute_floor
from ..results import median_item
from .records import record
from .seed_reference import design_style_job


@dataclass
class Case:
    """One configuration; ``id`` is the stable key the cost model and the charts use."""

    id: str
    label: str
    kind: str                 # "train" (our loop), "floor" (compute only), "pair" (two floors at once), "design"
    cfg: TrainConfig | None = None
    batch: int = 32           # floors and pairs
    threads: int = 1          # floors

    @property
    def world_size(self) -> int:
        return self.cfg.world_size if self.cfg else (2 if self.kind in ("design", "pair") else 1)

    @property
    def batch_per_rank(self) -> int:
        return self.cfg.batch_size if self.cfg else self.batch


QUICK = ("floor_1t_b32", "floor_1t_b128", "pair_b32", "pair_b128", "w1_1t_b32", "w1_1t_b128", "ddp_b32", "ddp_b64")


def cases(quick: bool) -> list[Case]:
    """Every case; with ``quick``, the few the cost model needs (a smoke run for CI)."""
    # gloo throughout, pinned: the cost model's inputs (syncstep, allreduce) are gloo's; the transport part
    # compares shared memory (the default where ranks share a node)
    c = lambda **kw: TrainConfig(**{"train_subset": 4096 if quick else 0, "comm": "gloo", **kw})  # noqa: E731
    every = [
        Case("design_w2", "original design's implementation, W=2", "design"),
        Case("floor_1t_b32", "compute floor, 1 thread, b32", "floor", threads=1, batch=32),
        Case("floor_2t_b32", "compute floor, 2 threads, b32", "floor", threads=2, batch=32),
        Case("floor_1t_b128", "compute floor, 1 thread, b128", "floor", threads=1, batch=128),
        Case("pair_b32", "compute floor, 2 processes at once, b32", "pair", batch=32),
        Case("pair_b128", "compute floor, 2 processes at once, b128", "pair", batch=128),
        Case("w1_1t_b32", "1 process, 1 thread, b32", "train", c(world_size=1, threads_per_rank=1)),
        Case("w1_2t_b32", "1 process, 2 threads, b32", "train", c(world_size=1, threads_per_rank=2)),
        Case("w1_1t_b128", "1 process, 1 thread, b128", "train", c(world_size=1, threads_per_rank=1, batch_size=128)),
        Case("ddp_b32", "DDP W=2, b32", "train", c(world_size=2)),
        Case("allreduce_b32", "manual all-reduce W=2, b32", "train", c(world_size=2, sync="allreduce")),
        Case("fp16_b32", "DDP fp16 hook W=2, b32", "train", c(world_size=2, sync="fp16")),
        Case("powersgd_b32", "DDP PowerSGD r4 W=2, b32", "train", c(world_size=2, sync="powersgd")),
        Case("nosync4_b32", "DDP no_sync k=4 W=2, b32", "train", c(world_size=2, accumulation_steps=4)),
        Case("localsgd8_b32", "local SGD k=8 W=2, b32", "train", c(world_size=2, sync="local_sgd")),
        Case("ddp_b128", "DDP W=2, b128", "train", c(world_size=2, batch_size=128)),
        # not used by the cost model's inputs: its check at other batch sizes (same rounds)
        Case("ddp_b64", "DDP W=2, b64", "train", c(world_size=2, batch_size=64)),
        Case("ddp_b256", "DDP W=2, b256", "train", c(world_size=2, batch_size=256)),
    ]
    return [case for case in every if case.id in QUICK] if quick else every


def _floor_job(place, emit: Callable, batch: int, threads: int, steps: int, start_at: float = 0.0) -> None:
    """The compute floor in a spawned process, like DDP's ranks; a pair starts at an agreed time."""
    while time.time() < start_at:
        time.sleep(0.001)
    emit("result", compute_floor(batch, threads, steps, steps))


def measure(case: Case, steps: int, data_root: str) -> dict:
    """One round of one case: step milliseconds (and the split, for our loop)."""
    counts = {"warmup_steps": steps, "timed_steps": steps}
    if case.kind == "floor":
        return {"ms": run_workers(_floor_job, 1, (case.batch, case.threads, steps))[0], **counts}
    if case.kind == "pair":
        both = run_workers(_floor_job, 2, (case.batch, 1, steps, time.time() + 8.0))
        return {"ms": max(both.values()), **counts}  # the slower of the two sets the pace
    if case.kind == "design":
        out = run_workers(design_style_job, 2, (data_root, steps, steps), launch_timeout_s=900)[0]
        return {"ms": out["step_ms"], "threads": out["threads"], **counts}
    cfg = case.cfg.replace(epochs=2, max_steps_per_epoch=steps, test_subset=500, lr_step=10)  # epoch 1 warms up
    result = launch(cfg, live=False, fresh_process=True)  # one process too: spawned, like DDP's ranks
    warmup, row = result.history
    return {"ms": row["step_ms"]["total"], "split_ms": row["step_ms"], "sync_fraction": row["sync_fraction"],
            "threads": result.record["runtime"]["threads_per_rank"], "comm": result.record["runtime"].get("comm"),
            "warmup_steps": warmup["steps_per_worker"], "timed_steps": row["steps_per_worker"],
            "peak_rss_mib_per_rank": result.record["runtime"]["peak_rss_mib_per_rank"]}


def summarise(case: Case, rounds: list[dict]) -> dict:
    """The median round (the lower middle one of an even count), so that its phases add up to its step."""
    ms = [r["ms"] for r in rounds]
    median = median_item(rounds, key=lambda r: r["ms"])
    out = {"id": case.id, "label": case.label, "kind": case.kind, "world_size": case.world_size,
           "batch_per_rank": case.batch_per_rank, "rounds_ms": ms, "step_ms": median["ms"],
           "step_ms_range": [min(ms), max(ms)], "threads_per_rank": rounds[0].get("threads", case.threads),
           "warmup_steps": median["warmup_steps"], "timed_steps": median["timed_steps"],
           "config": case.cfg.to_dict() if case.cfg else None}
    out["epoch_s"] = out["step_ms"] * steps_per_epoch(TRAIN_SAMPLES, case.world_size, case.batch_per_rank) / 1000
    if case.kind == "train":
        out["split_ms"], out["sync_fraction"] = median["split_ms"], median["sync_fraction"]
        out["peak_rss_mib_per_rank"] = median["peak_rss_mib_per_rank"]  # the spawned ranks' own peaks
        out["comm"] = median["comm"]  # how the all-reduces travelled, as the run's record says
    return out


def ratio(rows: dict, a: str, b: str) -> dict:
    """a's time over b's per round (rounds are paired: the same moment), and the median of those
    per-round ratios (the statistic quoted); the ratio of the two medians is kept beside it."""
    scale = {i: steps_per_epoch(TRAIN_SAMPLES, rows[i]["world_size"], rows[i]["batch_per_rank"]) for i in (a, b)}
    per_round = [x * scale[a] / (y * scale[b]) for x, y in zip(rows[a]["rounds_ms"], rows[b]["rounds_ms"])]
    return {"median": statistics.median(per_round), "rounds": per_round, "range": [min(per_round), max(per_round)],
            "ratio_of_medians": rows[a]["epoch_s"] / rows[b]["epoch_s"]}


def run_throughput(quick: bool, log: Callable[[str], None]) -> dict:
    root = str(ensure_mnist())
    repeats, steps = (1, 20) if quick else (5, 180)
    all_cases = cases(quick)
    measured: dict[str, list[dict]] = {c.id: [] for c in all_cases}
    orders = []
    for r in range(repeats):
        shift = r * len(all_cases) // repeats  # each case runs early in some rounds, late in others
        order = all_cases[shift:] + all_cases[:shift]
        orders.append([case.id for case in order])
        for case in order:
            measured[case.id].append(measure(case, steps, root))
            log(f"round {r + 1}/{repeats}  {case.label:<42} {measured[case.id][-1]['ms']:8.3f} ms/step")
    rows = {c.id: summarise(c, measured[c.id]) for c in all_cases}
    pairs = {"design_w2_vs_ddp_w2_epoch": ("design_w2", "ddp_b32"),
             "loop_vs_floor_w1_2t_step": ("w1_2t_b32", "floor_2t_b32"),
             "ddp_w2_vs_w1_2t_epoch": ("ddp_b32", "w1_2t_b32")}
    comparisons = {name: ratio(rows, a, b) for name, (a, b) in pairs.items() if a in rows and b in rows}
    return record("study_throughput", quick, {
        "rounds": repeats, "orders": orders, "order": "the case list rotated by len/rounds each round",
        "steps_cap": steps,
        "steps": f"floors, pairs and the design: {steps} warm-up, then {steps} timed steps; our loop: epoch 1 "
                 f"warms up, epoch 2 is timed, each cut at {steps} steps (fewer where an epoch is shorter: at W=2 "
                 "and b256 it has 118 on 60,000 samples); every case records its warmup_steps and timed_steps",
        "statistic": "per round: mean step time over the timed steps after the warm-up; the median round "
                     "(its phases add up to its step time); a comparison: the median of per-round ratios",
        "epoch_time": "step time x steps per epoch of 60,000 samples",
        "processes": "every case in freshly spawned workers (one process and the floors too), none in the study's",
        "denormals": "flushed to zero while the floor steps run (floors.denormals_flushed); training as it is"}, cases=list(rows.values()),
        comparisons=comparisons)
