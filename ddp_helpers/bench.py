"""Benchmarks: ``python -m ddp_helpers.bench {throughput,allreduce,cores,vcpu,syncstep,tta,all} [--quick]``.

* ``throughput``: per-step time and its split for each configuration, measured in
  alternating order with warm-up and repeats; epoch times are projected from the
  median step time. Includes the seed-style reference and the compute floor.
* ``cores``: one compute-only process against two at once: how much the second core adds.
* ``vcpu``: the same question moment by moment, with a cache-resident loop in 0.25 s windows.
* ``syncstep``: a W=2 training step that synchronises every step but sends ~no bytes.
* ``allreduce``: gloo all-reduce time against message size for 2 and 4 ranks, fitted
  to t = alpha + beta * bytes; the fit predicts each strategy's step time.
* ``tta``: time to 98% validation accuracy per strategy over several seeds.

Each part writes ``results/bench_<part>.json`` (self-describing) and a Markdown table.
Speed targets live here, never in unit tests: this machine is shared and noisy, so
only ratios measured side by side in one invocation are quoted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import TrainConfig
from .costmodel import AlphaBeta, floor_us_per_sample, tta_decomposition, tta_ratios
from .data import ensure_mnist, load_datasets, steps_per_epoch, train_indices
from .dist import process_group
from .engine import make_optimizer, train_one_epoch
from .launch import launch, run_single_process, run_workers
from .model import MLP
from .results import RESULTS_DIR, command_line, cpu_shares, cpu_ticks, environment, now_iso, save_json
from .seed_reference import seed_style_job
from .sync import DDP_HOOKS, DDPSync, LocalSync

GRAD_BYTES = 567_434 * 4
TRAIN_SAMPLES = 60_000


# --- throughput ---------------------------------------------------------------------------

@dataclass
class Case:
    """One configuration in the throughput benchmark."""

    name: str
    kind: str                     # "train" (our loop), "floor" (compute only), "pair" (two floors at once),
                                  # "seed" (reference)
    cfg: TrainConfig | None = None
    threads: int = 1              # for "floor"
    batch: int = 32               # for "floor"
    samples: list[dict] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.cfg.world_size if self.cfg else (2 if self.kind in ("seed", "pair") else 1)

    @property
    def samples_per_step(self) -> int:
        """Samples all ranks process in one (micro-)step."""
        if self.cfg:
            return self.cfg.batch_size * self.cfg.world_size
        return 64 if self.kind == "seed" else self.batch * self.world_size

    @property
    def global_batch(self) -> int:
        if self.cfg:
            return self.cfg.batch_size * self.cfg.world_size * self.cfg.accumulation_steps
        return 64 if self.kind == "seed" else self.batch * self.world_size


def floor_state(batch: int) -> tuple:
    """What the compute floor steps on: the model, fused Adam and one fixed random batch."""
    torch.manual_seed(0)
    model = MLP()
    optimizer, _ = make_optimizer(model.parameters(), 1e-3, 1e-5)
    return model, optimizer, torch.randn(batch, 784), torch.randint(0, 10, (batch,))


def floor_step(model, optimizer, x, y) -> None:
    """One compute-floor step: forward, backward and the optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def compute_floor(batch: int, threads: int, steps: int, warmup: int) -> dict:
    """Forward, backward and fused Adam on one fixed batch: no data loading, no sync."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        state = floor_state(batch)
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            floor_step(*state)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return {"step_ms": {"total": 1000 * statistics.median(times), "compute": None}}
    finally:
        torch.set_num_threads(previous)


def measure_train(case: Case, warmup: int, steps: int) -> dict:
    """Our loop: epoch 1 warms up, epoch 2 is measured (both capped at a number of steps)."""
    cfg = case.cfg.replace(epochs=2, max_steps_per_epoch=max(warmup, steps), test_subset=500, lr_step=10)
    result = launch(cfg) if cfg.world_size > 1 else run_single_process(cfg)
    row = result.history[-1]
    return {"step_ms": row["step_ms"], "sync_fraction": row["sync_fraction"],
            "threads_per_rank": result.record["runtime"]["threads_per_rank"]}


def measure_seed(data_root: str, warmup: int, steps: int) -> dict:
    out = run_workers(seed_style_job, 2, (data_root, warmup, steps), launch_timeout_s=900)[0]
    return {"step_ms": {"total": 1000 * statistics.median(out["step_s"])}, "threads_per_rank": out["threads"]}


def throughput_cases(quick: bool) -> list[Case]:
    base = dict(train_subset=0 if not quick else 8192, seed=0)
    c = lambda **kw: TrainConfig(**{**base, **kw})  # noqa: E731
    cases = [
        Case("seed-style reference, W=2", "seed"),
        Case("compute floor, 1 thread, b32", "floor", threads=1, batch=32),
        Case("compute floor, 2 threads, b32", "floor", threads=2, batch=32),
        Case("1 process, 1 thread, b32", "train", c(world_size=1, threads_per_rank=1)),
        Case("1 process, 2 threads, b32", "train", c(world_size=1, threads_per_rank=2)),
        Case("DDP W=2, b32", "train", c(world_size=2, sync="ddp")),
        Case("manual all-reduce W=2, b32", "train", c(world_size=2, sync="allreduce")),
        Case("DDP fp16 hook W=2, b32", "train", c(world_size=2, sync="fp16")),
        Case("DDP PowerSGD r4 W=2, b32", "train", c(world_size=2, sync="powersgd")),
        Case("DDP no_sync k=4 W=2, b32", "train", c(world_size=2, sync="ddp", accumulation_steps=4)),
        Case("local SGD k=8 W=2, b32", "train", c(world_size=2, sync="local_sgd", local_sgd_every=8)),
        Case("1 process, 1 thread, b256", "train", c(world_size=1, threads_per_rank=1, batch_size=256)),
        Case("1 process, 2 threads, b256", "train", c(world_size=1, threads_per_rank=2, batch_size=256)),
        Case("DDP W=2, b128 (global 256)", "train", c(world_size=2, sync="ddp", batch_size=128)),
        Case("compute floor, 1 thread, b128", "floor", threads=1, batch=128),
        # the same floors in two processes at once: the contention in this run, for the cost model
        Case("compute floor, 2 processes at once, b32", "pair", threads=1, batch=32),
        Case("compute floor, 2 processes at once, b128", "pair", threads=1, batch=128),
    ]
    return cases


def summarise(case: Case) -> dict:
    totals = [s["step_ms"]["total"] for s in case.samples]
    median = statistics.median(totals)
    steps = steps_per_epoch(TRAIN_SAMPLES, case.world_size, case.cfg.batch_size if case.cfg else case.batch)
    summary = {
        "name": case.name, "kind": case.kind, "world_size": case.world_size, "global_batch": case.global_batch,
        "repeats": len(totals), "step_ms_median": median, "step_ms_min": min(totals), "step_ms_max": max(totals),
        "steps_per_epoch": steps, "epoch_s_projected": median * steps / 1000,
        "samples_per_s": case.samples_per_step / (median / 1000),
        "threads_per_rank": case.samples[0].get("threads_per_rank", case.threads),
        "config": case.cfg.to_dict() if case.cfg else None,
    }
    if case.kind == "train":
        for phase in ("data", "compute", "sync", "optimizer"):
            summary[f"{phase}_ms"] = statistics.median(s["step_ms"][phase] for s in case.samples)
        summary["sync_fraction"] = statistics.median(s["sync_fraction"] for s in case.samples)
    return summary


def run_throughput(quick: bool, log: Callable[[str], None]) -> dict:
    root = str(ensure_mnist())
    repeats, warmup, steps = (1, 20, 40) if quick else (3, 100, 300)
    cases = throughput_cases(quick)
    for r in range(repeats):  # alternate: every case once per round, so drift hits all alike
        for case in cases:
            if case.kind == "seed":
                sample = measure_seed(root, 10 if quick else 30, 20 if quick else 100)
            elif case.kind == "floor":
                sample = compute_floor(case.batch, case.threads, steps, warmup)
            elif case.kind == "pair":
                both = run_workers(_floor_job, 2, (case.batch, steps, warmup, time.time() + 8.0))
                sample = max((both[r] for r in both), key=lambda b: b["step_ms"]["total"])
            else:
                sample = measure_train(case, warmup, steps)
            case.samples.append(sample)
            log(f"round {r + 1}/{repeats}  {case.name:<34} {sample['step_ms']['total']:8.3f} ms/step")
    rows = [summarise(c) for c in cases]
    by_name = {row["name"]: row for row in rows}
    ref_w1 = by_name["1 process, 2 threads, b32"]["epoch_s_projected"]
    ref_seed = by_name["seed-style reference, W=2"]["epoch_s_projected"]
    for row in rows:
        row["speedup_vs_1process_b32"] = ref_w1 / row["epoch_s_projected"]
        row["speedup_vs_seed_style"] = ref_seed / row["epoch_s_projected"]
    return {"kind": "bench_throughput", "created": now_iso(), "command": command_line(), "quick": quick,
            "method": {"repeats": repeats, "warmup_steps": warmup, "timed_steps": steps,
                       "epoch_time": "median step time x steps per epoch (projection)"},
            "environment": environment(), "cases": rows, "targets": throughput_targets(rows)}


def throughput_targets(rows: list[dict]) -> dict:
    """The issue's per-epoch targets from a throughput record's rows. The loop against its
    compute floor is given by medians and by the fastest round of each: a floor disturbed
    by the host in some rounds shows up as a median ratio far below 1."""
    by_name = {row["name"]: row for row in rows}
    loop, floor = by_name["1 process, 2 threads, b32"], by_name["compute floor, 2 threads, b32"]
    return {
        "ours_W2_vs_seed_style": by_name["seed-style reference, W=2"]["epoch_s_projected"]
        / by_name["DDP W=2, b32"]["epoch_s_projected"],
        "loop_vs_compute_floor_W1": loop["step_ms_median"] / floor["step_ms_median"],
        "loop_vs_compute_floor_W1_fastest_rounds": loop["step_ms_min"] / floor["step_ms_min"],
    }


# --- how well do the two cores compute side by side? ---------------------------------------

def _floor_job(rank: int, world_size: int, init_method: str, emit: Callable, batch: int, steps: int,
               warmup: int, start_at: float, threads: int = 1) -> None:
    """The compute floor in a spawned process, started at an agreed wall-clock time."""
    while time.time() < start_at:
        time.sleep(0.001)
    emit("result", compute_floor(batch, threads, steps, warmup))


SLOT_GAP_S = 0.3  # pause between two slots of floor_slots, so that one slot's steps end before the next begins


@dataclass(frozen=True)
class FloorSetup:
    """Who computes in one slot of :func:`floor_slots`: rank 0 alone, or both ranks at once."""

    name: str
    batch: int
    threads: int = 1
    both: bool = False  # True: ranks 0 and 1 compute side by side, 1 thread each


def _slots_job(rank: int, world_size: int, init_method: str, emit: Callable, setups: list[FloorSetup],
               rounds: int, seconds: float, warmup: int) -> None:
    """Two long-lived processes take turns: in each slot the set-up's ranks run compute-floor
    steps for ``seconds``, the other rank sleeps. Every set-up is warmed up (``warmup`` steps)
    before the first slot; the set-ups rotate from round to round, so a drift of the host hits
    all of them alike."""
    cfg = TrainConfig(world_size=world_size, backend="gloo", threads_per_rank=1, timeout_s=120)
    with process_group(cfg, rank, world_size, rank, init_method):
        states = {}
        for setup in setups:  # every model, optimizer and batch built and warmed up before the first slot
            if (rank == 0 or setup.both) and (setup.batch, setup.threads) not in states:
                torch.set_num_threads(setup.threads)
                state = floor_state(setup.batch)
                for _ in range(warmup):
                    floor_step(*state)
                states[setup.batch, setup.threads] = state
        start = torch.tensor([time.time() + 0.5], dtype=torch.float64)
        dist.broadcast(start, src=0)  # one clock for both: slot i starts at start + i * (seconds + SLOT_GAP_S)
        out = []
        for r in range(rounds):
            for i in range(len(setups)):
                setup = setups[(i + r) % len(setups)]
                slot_start = start.item() + (r * len(setups) + i) * (seconds + SLOT_GAP_S)
                while time.time() < slot_start:
                    time.sleep(0.0005)
                if rank != 0 and not setup.both:
                    continue
                torch.set_num_threads(setup.threads)
                state = states[setup.batch, setup.threads]
                times, n = [], 0
                while time.time() < slot_start + seconds:
                    step_start = time.perf_counter()
                    floor_step(*state)
                    n += 1
                    if n > 3:  # the first steps after a switch of threads and batch are not timed
                        times.append(time.perf_counter() - step_start)
                out.append({"round": r, "setup": setup.name, "ms": 1000 * statistics.median(times) if times else None})
        emit("result", out)


def floor_slots(setups: list[FloorSetup], rounds: int, seconds: float, warmup: int = 10) -> dict[str, list[float]]:
    """Compute-floor step time of each set-up, one value per round (for a pair: its slower rank)."""
    timeout = 120 + rounds * len(setups) * (seconds + SLOT_GAP_S)
    got = run_workers(_slots_job, 2, (setups, rounds, seconds, warmup), launch_timeout_s=timeout)
    per_round: dict[tuple[int, str], float] = {}
    for rows in got.values():
        for row in rows:
            if row["ms"] is not None:
                key = row["round"], row["setup"]
                per_round[key] = max(per_round.get(key, 0.0), row["ms"])
    return {s.name: [per_round[r, s.name] for r in range(rounds) if (r, s.name) in per_round] for s in setups}


def headroom_round(rounds: int, seconds: float, pair_batches=(128, 256), two_thread_batches=(256, 512)) -> dict:
    """Compute-floor step times (no data, no communication) of two 1-thread processes side by
    side and of one 2-thread process, at the batches the time-to-accuracy strategies use."""
    pairs = [FloorSetup(f"pair b{b}", b, both=True) for b in pair_batches]
    singles = [FloorSetup(f"2 threads b{b}", b, threads=2) for b in two_thread_batches]
    times = floor_slots(pairs + singles, rounds, seconds)
    return {"pair_ms": {str(s.batch): statistics.median(times[s.name]) for s in pairs},
            "two_threads_ms": {str(s.batch): statistics.median(times[s.name]) for s in singles},
            "rounds": rounds, "seconds_per_slot": seconds}


def run_cores(quick: bool, log: Callable[[str], None]) -> dict:
    """Compute-floor step time of one 1-thread process alone, of two such processes at once,
    and of one 2-thread process at twice the batch, in interleaved slots of two long-lived
    processes. The pair against the 2-thread process is the ceiling for any 2-worker strategy
    against a single process on this machine; ``one alone`` against the 2-thread process is
    that ceiling if the two processes did not slow each other down at all."""
    rounds, seconds = (1, 0.5) if quick else (12, 2.0)
    batches = (32, 128, 256)
    setups = [setup for b in batches for setup in (FloorSetup(f"alone b{b}", b), FloorSetup(f"pair b{b}", b, both=True),
                                                   FloorSetup(f"2 threads b{b}", 2 * b, threads=2))]
    times = floor_slots(setups, rounds, seconds)
    rows = []
    for b in batches:
        alone, pair, double = times[f"alone b{b}"], times[f"pair b{b}"], times[f"2 threads b{b}"]
        a, t, d = statistics.median(alone), statistics.median(pair), statistics.median(double)
        per_round = [dd / tt for dd, tt in zip(double, pair)]
        ideal = [dd / aa for dd, aa in zip(double, alone)]
        rows.append({"batch": b, "alone_ms": a, "two_at_once_ms": t, "slowdown": t / a,
                     "two_process_throughput_vs_one": 2 * a / t, "one_process_2_threads_double_batch_ms": d,
                     "two_processes_vs_2_threads": d / t,
                     "two_processes_vs_2_threads_rounds": per_round,
                     "without_contention_vs_2_threads": d / a, "without_contention_vs_2_threads_rounds": ideal,
                     "step_ms_rounds": {"alone": alone, "pair": pair, "two_threads_double_batch": double}})
        log(f"b{b}: one process {a:.2f} ms/step, two at once {t:.2f} ms/step "
            f"-> two processes give {2 * a / t:.2f}x the throughput of one; one 2-thread process at "
            f"b{2 * b}: {d:.2f} ms/step -> the pair is {d / t:.2f}x as fast "
            f"(rounds {min(per_round):.2f}-{max(per_round):.2f}), {d / a:.2f}x if they did not slow each other")
    return {"kind": "bench_cores", "created": now_iso(), "command": command_line(), "quick": quick,
            "method": {"rounds": rounds, "seconds_per_slot": seconds,
                       "what": "forward+backward+fused Adam on a fixed batch, no data, no sync, in two long-lived "
                               "processes taking turns in slots: one 1-thread process alone, two at once (the "
                               "slower), one 2-thread process at twice the batch; medians over the rounds, set-ups "
                               "rotated from round to round"},
            "environment": environment(), "rows": rows}


# --- do the two virtual cores compute independently, moment by moment? ---------------------

def _rate_job(rank: int, world_size: int, init_method: str, emit: Callable, seconds: float, start_at: float,
              window_s: float) -> None:
    """Matrix products per second of a 64x64 matmul loop (cache-resident: no memory traffic),
    one value per window, in one thread."""
    torch.set_num_threads(1)
    a, b, out = torch.randn(64, 64), torch.randn(64, 64), torch.empty(64, 64)
    while time.time() < start_at:
        time.sleep(0.001)
    rates, end = [], start_at + seconds
    while time.time() < end:
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < window_s:
            for _ in range(100):
                torch.mm(a, b, out=out)
            n += 100
        rates.append(n / (time.perf_counter() - start))
    emit("result", rates)


def run_vcpu(quick: bool, log: Callable[[str], None]) -> dict:
    """A cache-resident compute loop in short windows, one process alone and then two at once,
    alternating. If the two virtual cores were always separate physical cores, each of the pair
    would run at the speed of the one alone in every window; windows well below it mean the
    pair shared hardware at that moment (sibling hyperthreads, or a neighbour's load)."""
    rounds, seconds, window = (1, 3.0, 0.25) if quick else (3, 15.0, 0.25)
    out = []
    for i in range(rounds):
        alone = run_workers(_rate_job, 1, (seconds, time.time() + 3.0, window))[0]
        both = run_workers(_rate_job, 2, (seconds, time.time() + 8.0, window))
        base = statistics.median(alone)
        together = [r / base for rank in sorted(both) for r in both[rank]]
        out.append({"alone_rate_median": base, "alone_relative": [r / base for r in alone],
                    "together_relative": together})
        log(f"round {i}: two at once, per {window} s window, relative to one alone: median "
            f"{statistics.median(together):.2f}, {sum(r < 0.85 for r in together) / len(together):.0%} of windows below 0.85")
    every = [r for o in out for r in o["together_relative"]]
    return {"kind": "bench_vcpu", "created": now_iso(), "command": command_line(), "quick": quick,
            "method": {"rounds": rounds, "seconds": seconds, "window_s": window,
                       "what": "64x64 float32 matmul loop, 1 thread per process, cache-resident; rates relative to "
                               "the median rate of the process alone in the same round"},
            "environment": environment(), "rounds": out,
            "together_median": statistics.median(every),
            "together_share_below_0_85": sum(r < 0.85 for r in every) / len(every)}


# --- the cost of synchronising every step, measured in training ------------------------------

class ProbeSync(LocalSync):
    """Benchmark-only strategy: all-reduces one float per step and no gradients, so a W=2
    step pays the full per-step synchronisation (waiting for the slower rank, waking up)
    but almost no bytes. Not a way to train: the replicas drift apart."""

    name = "probe"

    def __init__(self, model, optimizer):
        super().__init__(model, optimizer)
        self.flag = torch.zeros(1)

    def after_backward(self):
        dist.all_reduce(self.flag)  # timed by the engine as the step's sync phase


def _timed_steps(cfg: TrainConfig, rank: int, world_size: int, make_strategy: Callable, train, reduce,
                 warmup: int, steps: int) -> dict:
    """A fresh model trained through the shared engine with the given strategy: ``warmup``
    steps, then ``steps`` timed ones; returns the timed part's summary."""
    torch.manual_seed(cfg.seed)
    model = MLP(cfg.hidden_sizes, cfg.dropout)
    optimizer, _ = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    sync = make_strategy(model, optimizer)
    indices = train_indices(len(train), rank, world_size, 0, cfg.seed)
    train_one_epoch(sync, optimizer, train, indices, cfg.batch_size, reduce=reduce, max_steps=warmup)
    return train_one_epoch(sync, optimizer, train, indices, cfg.batch_size, reduce=reduce, max_steps=steps)


def _probe_job(rank: int, world_size: int, init_method: str, emit: Callable, cfg_dict: dict, warmup: int,
               steps: int) -> None:
    """The training step through the shared engine, with ProbeSync plugged in."""
    cfg = TrainConfig.from_dict(cfg_dict)
    with process_group(cfg, rank, world_size, rank, init_method) as ctx:
        train, _ = load_datasets(cfg.dataset, cfg.data_dir, cfg.train_subset, 1, cfg.seed)
        out = _timed_steps(cfg, rank, world_size, ProbeSync, train, ctx.reduce, warmup, steps)
        if rank == 0:
            emit("result", {"step_ms": 1000 * out["epoch_time_s"] / out["steps"],
                            "sync_ms": 1000 * out["phase_s"]["sync"] / out["steps"]})


def _hook_job(rank: int, world_size: int, init_method: str, emit: Callable, cfg_dict: dict, warmup: int,
              steps: int) -> None:
    """One rank alone, 1 thread: the training step plain and through each DDP hook. The
    all-reduce of one rank moves nothing, so the difference is the hook's own computation
    (DDP's bucket copies; fp16 casts; PowerSGD's matrix products and orthogonalisation)."""
    cfg = TrainConfig.from_dict(cfg_dict)
    with process_group(cfg, rank, world_size, rank, init_method) as ctx:
        train, _ = load_datasets(cfg.dataset, cfg.data_dir, cfg.train_subset, 1, cfg.seed)
        out = {}
        for name in ("local", *DDP_HOOKS):
            strategy = LocalSync if name == "local" else (
                lambda model, optimizer, hook=name: DDPSync(model, optimizer, torch.device("cpu"), hook=hook))
            done = _timed_steps(cfg, rank, world_size, strategy, train, ctx.reduce, warmup, steps)
            out[name] = 1000 * done["epoch_time_s"] / done["steps"]
        emit("result", out)


def run_syncstep(quick: bool, log: Callable[[str], None]) -> dict:
    """Step time of 2 ranks that synchronise every step but exchange (almost) no bytes."""
    root = str(ensure_mnist())
    repeats, warmup, steps = (1, 20, 40) if quick else (3, 100, 300)
    rows = []
    for batch in (32, 128):
        cfg = TrainConfig(world_size=2, batch_size=batch, data_dir=root, train_subset=8192 if quick else 0)
        samples = [run_workers(_probe_job, 2, (cfg.to_dict(), warmup, steps))[0] for _ in range(repeats)]
        step = statistics.median(s["step_ms"] for s in samples)
        rows.append({"batch": batch, "step_ms": step, "sync_ms": statistics.median(s["sync_ms"] for s in samples),
                     "repeats": repeats})
        log(f"b{batch}: W=2 step that synchronises 4 bytes per step: {step:.2f} ms")
    cfg = TrainConfig(world_size=1, threads_per_rank=1, data_dir=root, train_subset=8192 if quick else 0)
    hooks = [run_workers(_hook_job, 1, (cfg.to_dict(), warmup, steps))[0] for _ in range(repeats)]
    hook_ms = {name: statistics.median(h[name] for h in hooks) for name in hooks[0]}
    log("b32, one rank, 1 thread, step ms: " + ", ".join(f"{k} {v:.2f}" for k, v in hook_ms.items()))
    return {"kind": "bench_syncstep", "created": now_iso(), "command": command_line(), "quick": quick,
            "method": {"repeats": repeats, "warmup_steps": warmup, "timed_steps": steps,
                       "what": "our training step on 2 gloo ranks, 1 thread each, all-reducing one float per "
                               "step instead of the gradient (ProbeSync); and one rank alone through each DDP "
                               "hook (hook_w1_ms: the hooks' own computation, nothing to communicate)"},
            "environment": environment(), "rows": rows, "hook_w1_ms": {"batch": 32, **hook_ms}}


# --- all-reduce cost model ----------------------------------------------------------------

def _allreduce_job(rank: int, world_size: int, init_method: str, emit: Callable, sizes: list[int],
                   repeats: int) -> None:
    cfg = TrainConfig(world_size=world_size, backend="gloo", threads_per_rank=1, timeout_s=60)
    with process_group(cfg, rank, world_size, rank, init_method):
        out = {}
        for size in sizes:
            tensor = torch.ones(max(1, size // 4))
            for _ in range(5):
                dist.all_reduce(tensor)
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(tensor)
                times.append(time.perf_counter() - start)
            out[size] = statistics.median(times)
        if rank == 0:
            emit("result", out)


def run_allreduce(quick: bool, log: Callable[[str], None]) -> dict:
    sizes = [2**k for k in range(10, 24, 1 if not quick else 3)] + [GRAD_BYTES]
    sizes = sorted(set(sizes))
    repeats = 10 if quick else 40
    runs = {}
    for world_size in (2, 4):
        medians = run_workers(_allreduce_job, world_size, (sizes, repeats), launch_timeout_s=600)[0]
        ab = AlphaBeta.fit(sizes, [medians[s] for s in sizes])
        alpha, beta = ab.alpha_s, ab.beta_s_per_byte
        runs[str(world_size)] = {"seconds": {str(s): medians[s] for s in sizes}, "alpha_s": alpha, "beta_s_per_byte": beta,
                                 "oversubscribed": world_size > 2}
        log(f"W={world_size}: alpha {1e6 * alpha:.0f} us, beta {1e9 * beta:.3f} ns/byte "
            f"({1 / beta / 1e9:.2f} GB/s), 2.27 MB takes {1000 * medians[GRAD_BYTES]:.2f} ms")
    return {"kind": "bench_allreduce", "created": now_iso(), "command": command_line(), "quick": quick,
            "method": {"repeats": repeats, "statistic": "median", "backend": "gloo", "threads_per_rank": 1,
                       "fit": "t = alpha + beta * bytes, least squares on relative error"},
            "environment": environment(), "sizes_bytes": sizes, "world_sizes": runs}


# --- time to accuracy ---------------------------------------------------------------------

TTA_TARGET = 0.98
# The large-batch settings, each used by both sides: global batch 256 with lr 2e-3, and global
# batch 512 with twice that rate (linear scaling), each with 100 warm-up steps.
LARGE_BATCH = dict(lr=2e-3, warmup_steps=100)
LARGER_BATCH = dict(lr=4e-3, warmup_steps=100)


def tta_configs(quick: bool) -> dict[str, TrainConfig]:
    """Every strategy with the seed's settings (b32, lr 1e-3) and the large-batch ones."""
    common = dict(stop_at_accuracy=TTA_TARGET, epochs=2 if quick else 8, evals_per_epoch=4,
                  train_subset=4096 if quick else 0, test_subset=2000 if quick else 0)
    c = lambda **kw: TrainConfig(**{**common, **kw})  # noqa: E731
    big = lambda **kw: c(**LARGE_BATCH, **kw)  # noqa: E731
    bigger = lambda **kw: c(**LARGER_BATCH, **kw)  # noqa: E731
    return {
        "1 process, 1 thread, b32 (seed settings)": c(world_size=1, threads_per_rank=1),
        "1 process, 2 threads, b32 (seed settings)": c(world_size=1, threads_per_rank=2),
        "1 process, 1 thread, b256, lr 2e-3, warm-up": big(world_size=1, threads_per_rank=1, batch_size=256),
        "1 process, 2 threads, b256, lr 2e-3, warm-up": big(world_size=1, threads_per_rank=2, batch_size=256),
        "1 process, 1 thread, b512, lr 4e-3, warm-up": bigger(world_size=1, threads_per_rank=1, batch_size=512),
        "1 process, 2 threads, b512, lr 4e-3, warm-up": bigger(world_size=1, threads_per_rank=2, batch_size=512),
        "DDP W=2, b32 (seed settings)": c(world_size=2),
        "local SGD k=8 W=2, b32 (seed settings)": c(world_size=2, sync="local_sgd", local_sgd_every=8),
        "DDP W=2, b128 (global 256), lr 2e-3, warm-up": big(world_size=2, batch_size=128),
        "manual all-reduce W=2, b128, lr 2e-3, warm-up": big(world_size=2, sync="allreduce", batch_size=128),
        "DDP fp16 W=2, b128, lr 2e-3, warm-up": big(world_size=2, sync="fp16", batch_size=128),
        "DDP PowerSGD W=2, b128, lr 2e-3, warm-up": big(world_size=2, sync="powersgd", batch_size=128),
        "DDP no_sync k=4 W=2, b32 x 4, lr 2e-3, warm-up": big(world_size=2, batch_size=32, accumulation_steps=4),
        "local SGD k=8 W=2, b128, lr 2e-3, warm-up": big(world_size=2, sync="local_sgd", local_sgd_every=8,
                                                        batch_size=128),
        "overlapped local SGD k=8 W=2, b128, lr 2e-3, warm-up": big(world_size=2, sync="local_sgd_overlap",
                                                                   local_sgd_every=8, batch_size=128),
        "overlapped local SGD k=4 W=2, b128, lr 2e-3, warm-up": big(world_size=2, sync="local_sgd_overlap",
                                                                   local_sgd_every=4, batch_size=128),
        "local SGD k=8 W=2, b256 (global 512), lr 4e-3, warm-up": bigger(world_size=2, sync="local_sgd",
                                                                        local_sgd_every=8, batch_size=256),
    }


def time_to_target(history: list[dict], target: float = TTA_TARGET) -> dict:
    """When a run first reached the target: at the first validation pass (several per epoch)
    and, for comparison, at the first epoch end. Seconds are training time only."""
    points, before = [], 0.0
    for row in history:
        for e in row.get("evals") or [{"epoch_fraction": 1.0, "train_time_s": row["epoch_time_s"],
                                       "val_accuracy": row["val_accuracy"]}]:
            points.append({"epoch": row["epoch"] - 1 + e["epoch_fraction"], "train_s": before + e["train_time_s"],
                           "val_accuracy": e["val_accuracy"]})
        before += row["epoch_time_s"]
    hit = next((p for p in points if p["val_accuracy"] >= target), None)
    at_end = [p for p in points if p["epoch"] == int(p["epoch"])]
    hit_end = next((p for p in at_end if p["val_accuracy"] >= target), None)
    return {"reached": hit is not None, "epochs_to_target": hit and hit["epoch"],
            "seconds_to_target": hit and hit["train_s"], "epochs_to_target_at_epoch_end": hit_end and hit_end["epoch"],
            "seconds_to_target_at_epoch_end": hit_end and hit_end["train_s"], "points": points}


def run_tta(quick: bool, log: Callable[[str], None], seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    ensure_mnist()
    configs = tta_configs(quick)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    headroom: dict[str, list[dict]] = {}
    rounds, seconds = (1, 0.5) if quick else (2, 1.5)
    for seed in seeds:  # alternate strategies within each seed
        # the machine's headroom for a second process, measured before and after this seed's runs
        headroom[str(seed)] = [headroom_round(rounds, seconds)]
        for name, cfg in configs.items():
            hist = launch(cfg.replace(seed=seed)).history
            reached = time_to_target(hist)
            got = {"seed": seed, **reached, "best_val_accuracy": max(p["val_accuracy"] for p in reached["points"]),
                   "epoch_time_s": [r["epoch_time_s"] for r in hist], "steps_per_epoch": hist[0]["steps_per_worker"],
                   "step_ms": [r["step_ms"] for r in hist], "sync_fraction": [r["sync_fraction"] for r in hist]}
            runs[name].append(got)
            log(f"seed {seed}  {name:<48} " + (f"98% at epoch {got['epochs_to_target']:.2f}, "
                                               f"{got['seconds_to_target']:.1f} s" if got["reached"]
                                               else f"not reached (best {got['best_val_accuracy']:.2%})"))
        headroom[str(seed)].append(headroom_round(rounds, seconds))
        for b, tb in ((128, 256), (256, 256), (256, 512)):
            before, after = (two_threads / pair for pair, two_threads in
                             (floor_us_per_sample(h, b, tb) for h in headroom[str(seed)]))
            log(f"seed {seed}  compute only, per sample: pair b{b} vs 2-thread process b{tb}: "
                f"{before:.2f}x before, {after:.2f}x after")
    summary = []
    for name, rs in runs.items():
        secs = [r["seconds_to_target"] for r in rs if r["reached"]]
        summary.append({"name": name, "config": configs[name].to_dict(), "seeds": len(rs),
                        "reached": sum(r["reached"] for r in rs),
                        "seconds": secs, "seconds_mean": statistics.mean(secs) if secs else None,
                        "seconds_median": statistics.median(secs) if secs else None,
                        "seconds_stdev": statistics.stdev(secs) if len(secs) > 1 else None,
                        "epochs": [r["epochs_to_target"] for r in rs]})
    record = {"kind": "bench_tta", "created": now_iso(), "command": command_line(), "quick": quick,
              "method": {"target": TTA_TARGET, "evals_per_epoch": 4, "seeds": list(seeds),
                         "seconds": "training time only (evaluation excluded), cumulative to the first validation "
                                    "pass (4 per epoch, at equal step intervals) whose accuracy reaches the target",
                         "large_batch_settings": [{"global_batch": 256, **LARGE_BATCH},
                                                  {"global_batch": 512, **LARGER_BATCH}]},
              "environment": environment(), "runs": runs, "summary": summary, "headroom": headroom}
    record["method"]["headroom"] = (f"compute floor before and after each seed's runs ({rounds} rounds of "
                                    f"{seconds} s slots in two long-lived processes): two 1-thread processes side "
                                    f"by side at b128 and b256, one 2-thread process at b256 and b512")
    record["ratios"] = tta_ratios(record)
    record["decomposition"] = tta_decomposition(record)
    return record


# --- reporting ----------------------------------------------------------------------------

def markdown_throughput(record: dict) -> str:
    lines = ["| configuration | W | global batch | threads/rank | step ms (median, min-max) | projected epoch s "
             "| samples/s | sync % | vs 1 process b32 | vs seed-style |", "|" + "---|" * 10]
    for r in record["cases"]:
        sync = f"{100 * r['sync_fraction']:.0f}" if "sync_fraction" in r else "-"
        lines.append(f"| {r['name']} | {r['world_size']} | {r['global_batch']} | {r['threads_per_rank']} | "
                     f"{r['step_ms_median']:.2f} ({r['step_ms_min']:.2f}-{r['step_ms_max']:.2f}) | "
                     f"{r['epoch_s_projected']:.2f} | {r['samples_per_s']:.0f} | {sync} | "
                     f"{r['speedup_vs_1process_b32']:.2f}x | {r['speedup_vs_seed_style']:.1f}x |")
    t = record["targets"]
    lines += ["", f"Our DDP W=2 vs the seed-style reference: {t['ours_W2_vs_seed_style']:.1f}x faster per epoch "
              "(target >= 5x).", f"Our W=1 loop vs its compute floor: {t['loop_vs_compute_floor_W1']:.2f}x by medians, "
              f"{t['loop_vs_compute_floor_W1_fastest_rounds']:.2f}x by fastest rounds (target <= 1.3x)."]
    return "\n".join(lines) + "\n"


def markdown_tta(record: dict) -> str:
    lines = ["| strategy | seeds reaching 98% | epochs to 98% | seconds to 98% per seed | mean ± sd |",
             "|---|---|---|---|---|"]
    for s in record["summary"]:
        secs = "-" if s["seconds_mean"] is None else (
            f"{s['seconds_mean']:.1f}" + (f" ± {s['seconds_stdev']:.1f}" if s["seconds_stdev"] is not None else ""))
        epochs = ", ".join("-" if e is None else f"{e:.2f}" for e in s["epochs"])
        per_seed = ", ".join(f"{x:.1f}" for x in s["seconds"])
        lines.append(f"| {s['name']} | {s['reached']}/{s['seeds']} | {epochs} | {per_seed} | {secs} |")
    r = record.get("ratios", {})
    for key, label in (("speedup_vs_1_thread", "best 1-thread process"), ("speedup_vs_2_threads",
                                                                          "best 2-thread process")):
        if key in r:
            lines.append(f"\nBest 2-worker strategy ({r['best_2_workers']}) vs {label}: {r[key]:.2f}x by mean time; "
                         f"per seed {', '.join(f'{x:.2f}' for x in r[key + '_per_seed'])}x.")
    d = record.get("decomposition", {})
    if d.get("applies"):
        lines += ["", f"Why: {d['two_workers']} against {d['two_threads']}, seed by seed "
                  "(ratio = samples x compute x sync, all three measured in the runs; compute = headroom x loop, with "
                  "the compute-only headroom measured before and after each seed's runs).", "",
                  f"| seed | ratio | samples | compute (in the runs) | compute needed for {d['target_ratio']}x | sync "
                  "| sync ms/step | headroom before, after (mean) | loop |", "|---|---|---|---|---|---|---|---|---|"]
        for row in d["seeds"]:
            rounds = ", ".join(f"{h:.2f}" for h in row["headroom_rounds"])
            lines.append(f"| {row['seed']} | {row['ratio']:.2f} | {row['samples']:.2f} | {row['compute_ratio']:.2f} "
                         f"| {row['needed_compute_ratio']:.2f} | {row['sync']:.2f} | {row['sync_ms_per_step']:.2f} "
                         f"| {rounds} ({row['headroom']:.2f}) | {row['loop']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp_helpers.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["throughput", "allreduce", "cores", "vcpu", "syncstep", "tta", "all"])
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat, a data subset (CI)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for bench_*.json and bench_*.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    parts = ["allreduce", "cores", "vcpu", "syncstep", "throughput", "tta"] if args.part == "all" else [args.part]
    log = lambda line: print(line, flush=True)  # noqa: E731
    suffix = "_quick" if args.quick else ""
    for part in parts:
        before = cpu_ticks()
        record = {"throughput": run_throughput, "allreduce": run_allreduce, "cores": run_cores, "vcpu": run_vcpu,
                  "syncstep": run_syncstep, "tta": run_tta}[part](args.quick, log)
        record["cpu_time_shares"] = cpu_shares(before, cpu_ticks())  # steal > 0: the host took our cores
        path = save_json(record, out / f"bench_{part}{suffix}.json")
        table = {"throughput": markdown_throughput, "tta": markdown_tta}.get(part)
        if table:
            (out / f"bench_{part}{suffix}.md").write_text(table(record))
            print(table(record))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
