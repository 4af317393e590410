"""What communication costs here: the gloo all-reduce against message size (``allreduce``),
and a training step that synchronises every step but sends almost nothing (``syncstep``)."""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..data import batches, load_datasets, train_indices
from ..dist import job_group
from ..engine import Profiler, Tally, make_optimizer, step
from ..place import RankPlace
from ..model import MLP
from ..sync import DDPSync, LocalSync
from ..sync.ddp import DDP_HOOKS, refusal
from ..workers import run_workers
from .records import record


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of one full gradient: what every step's all-reduce moves."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def weight_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(outputs, inputs) of each weight matrix, in order: what PowerSGD compresses."""
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)]


GRAD_BYTES = gradient_bytes(MLP())
WEIGHT_SHAPES = weight_shapes(MLP())


def fit_alpha_beta(sizes, seconds) -> tuple[float, float]:
    """t = alpha + beta * bytes, least squares on *relative* error (weights 1/t), so that small
    messages count as much as large ones."""
    t = np.asarray(seconds, float)
    beta, alpha = np.polyfit(np.asarray(sizes, float), t, 1, w=1 / t)
    return float(alpha), float(beta)


def allreduce_rounds(sizes: list[int], repeats: int, rounds: int = 1) -> dict[int, list[list[float]]]:
    """Seconds of each timed float32 all-reduce of each size in the current process group, grouped by
    round: 5 untimed first, then ``repeats`` timed, each after a barrier so all ranks start together.
    With ``rounds`` > 1 the timed calls are split into rounds that visit the sizes in a shuffled order
    (the same on every rank: a seeded shuffle), so that a slow minute of the host lands on many sizes,
    not on one."""
    tensors = {size: torch.ones(max(1, size // 4)) for size in sizes}
    for size in sizes:
        for _ in range(5):
            dist.all_reduce(tensors[size])
    times: dict[int, list[list[float]]] = {size: [[] for _ in range(rounds)] for size in sizes}
    order, shuffle = list(sizes), random.Random(0).shuffle
    for r in range(rounds):
        if rounds > 1:
            shuffle(order)
        for size in order:
            for _ in range(repeats // rounds + (r < repeats % rounds)):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(tensors[size])
                times[size][r].append(time.perf_counter() - start)
    return times


def pooled_median(per_round: list[list[float]]) -> float:
    """The median of every timed repeat, whichever round it fell in."""
    return statistics.median(t for rnd in per_round for t in rnd)


def allreduce_medians(sizes: list[int], repeats: int, rounds: int = 1) -> dict[int, float]:
    """Median seconds over all timed repeats of each size (see ``allreduce_rounds``)."""
    return {size: pooled_median(per_round) for size, per_round in allreduce_rounds(sizes, repeats, rounds).items()}


def _allreduce_job(place: RankPlace, emit: Callable, sizes: list[int], repeats: int, rounds: int) -> None:
    with job_group(place, 60):
        times = allreduce_rounds(sizes, repeats, rounds)
        if place.rank == 0:
            emit("result", times)  # the parent takes the medians


def run_allreduce(quick: bool, log: Callable[[str], None]) -> dict:
    sizes = sorted({*(2**k for k in range(10, 24, 3 if quick else 1)), GRAD_BYTES})
    repeats, rounds, runs = (10 if quick else 40), (2 if quick else 5), {}
    for world_size in (2, 4):
        times = run_workers(_allreduce_job, world_size, (sizes, repeats, rounds), launch_timeout_s=600)[0]
        medians = {size: pooled_median(times[size]) for size in sizes}
        alpha, beta = fit_alpha_beta(sizes, [medians[s] for s in sizes])
        runs[str(world_size)] = {"seconds": {str(s): medians[s] for s in sizes},
                                 "round_medians_s": {str(s): [statistics.median(rnd) for rnd in times[s]] for s in sizes}, "alpha_s": alpha,
                                 "beta_s_per_byte": beta, "oversubscribed": world_size > 2}
        log(f"W={world_size}: alpha {1e6 * alpha:.0f} µs, beta {1e9 * beta:.3f} ns/byte; the "
            f"{GRAD_BYTES / 1e6:.2f} MB gradient takes {1000 * medians[GRAD_BYTES]:.2f} ms")
    return record("study_allreduce", quick, {"repeats": repeats, "rounds": rounds, "backend": "gloo",
                                             "order": "each round visits the sizes shuffled (seeded: the same on "
                                                      "every rank)", "statistic": "median of all repeats; "
                                                          "each round's median as its spread",
                                             "fit": "t = alpha + beta * bytes, least squares on relative error"},
                  gradient_bytes=GRAD_BYTES, sizes_bytes=sizes, world_sizes=runs)


class ProbeSync(LocalSync):
    """Study-only strategy: all-reduces one float per step and no gradients, so that a W=2 step
    pays the whole per-step synchronisation (waiting for the slower rank, one message's fixed
    cost) but almost no bytes. Not a way to train: the replicas drift apart."""

    name = "probe"

    def __init__(self, model, optimizer, profiler=None):
        super().__init__(model, optimizer)
        self.flag = torch.zeros(1)

    def after_backward(self):
        dist.all_reduce(self.flag)  # timed by the engine as the step's sync phase


def timed_steps(cfg: TrainConfig, rank: int, world_size: int, make_strategy: Callable, train, warmup: int,
                steps: int) -> dict:
    """Milliseconds per step of a fresh model trained through the shared engine with the strategy
    (``make_strategy(model, optimizer, profiler)``), and their split by phase: {"ms": ..., "split_ms": {phase: ...}}."""
    torch.manual_seed(cfg.seed)
    model = MLP(cfg.hidden_sizes, cfg.dropout)
    optimizer, _ = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    profiler = Profiler(torch.device("cpu"))
    sync, tally = make_strategy(model, optimizer, profiler), Tally(torch.device("cpu"))
    b, epochs = cfg.batch_size, 1
    while epochs * (len(train) // world_size) < (warmup + steps) * b:  # enough epochs' shards for every step
        epochs += 1
    indices = torch.cat([train_indices(len(train), rank, world_size, epoch, cfg.seed) for epoch in range(epochs)])
    for timed, part in ((False, indices[:warmup * b]), (True, indices[warmup * b:(warmup + steps) * b])):
        profiler.take()  # the warm-up's laps are dropped
        profiler.restart()
        start = time.perf_counter()
        for x, y in batches(train, part, b):
            profiler.lap("data")
            step(sync, optimizer, x, y, tally, profiler)
    return {"ms": 1000 * (time.perf_counter() - start) / steps,
            "split_ms": {phase: 1000 * s / steps for phase, s in profiler.take().items()}}


def local_strategy(model, optimizer, profiler) -> LocalSync:
    """A ``make_strategy`` for :func:`timed_steps` that synchronises nothing: one process's step."""
    return LocalSync(model, optimizer)


def _probe_job(place: RankPlace, emit: Callable, cfg_dict: dict, warmup: int, steps: int) -> None:
    cfg = TrainConfig.from_dict(cfg_dict)
    with job_group(place, 60):
        train, _ = load_datasets(cfg.dataset, cfg.data_dir, cfg.train_subset, 1, cfg.seed)
        ms = timed_steps(cfg, place.rank, place.world_size, ProbeSync, train, warmup, steps)["ms"]
        if place.rank == 0:
            emit("result", ms)


def _hook_job(place: RankPlace, emit: Callable, cfg_dict: dict, warmup: int, steps: int) -> None:
    """One rank alone: the step plain and through each DDP hook. An all-reduce of one rank moves
    nothing, so the difference is the hook's own computation (bucket copies, fp16 casts,
    PowerSGD's matrix products). A hook that torch cannot run on CPU tensors here (PowerSGD on a
    machine that has CUDA) is left out of the result."""
    cfg = TrainConfig.from_dict(cfg_dict)
    rank, world_size = place.rank, place.world_size
    with job_group(place, 60) as ctx:
        train, _ = load_datasets(cfg.dataset, cfg.data_dir, cfg.train_subset, 1, cfg.seed)
        out = {"local": timed_steps(cfg, rank, world_size, local_strategy, train, warmup, steps)["ms"]}
        for hook in (h for h in DDP_HOOKS if refusal(h, torch.device("cpu")) is None):
            out[hook] = timed_steps(cfg, rank, world_size, lambda model, opt, profiler, h=hook: DDPSync(
                model, opt, torch.device("cpu"), hook=h, transport=ctx.transport, profiler=profiler), train, warmup,
                steps)["ms"]
        emit("result", out)


def run_syncstep(quick: bool, log: Callable[[str], None]) -> dict:
    """W=2 steps that synchronise 4 bytes, at b32 and b128; and each hook's computation at b32."""
    repeats, warmup, steps = (1, 20, 20) if quick else (3, 300, 300)
    subset, probe = (4096 if quick else 0), {}
    for batch in (32, 128):
        cfg = TrainConfig(world_size=2, batch_size=batch, train_subset=subset)
        probe[str(batch)] = statistics.median(run_workers(_probe_job, 2, (cfg.to_dict(), warmup, steps))[0]
                                              for _ in range(repeats))
        log(f"b{batch}: a W=2 step that synchronises 4 bytes per step: {probe[str(batch)]:.2f} ms")
    cfg = TrainConfig(world_size=1, threads_per_rank=1, train_subset=subset)
    hooks = [run_workers(_hook_job, 1, (cfg.to_dict(), warmup, steps))[0] for _ in range(repeats)]
    hook_ms = {name: statistics.median(h[name] for h in hooks) for name in hooks[0]}
    log("b32, one rank, 1 thread, ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in hook_ms.items()))
    return record("study_syncstep", quick, {
        "repeats": repeats, "warmup_steps": warmup, "timed_steps": steps, "statistic": "median of repeats",
        "what": "our step on 2 gloo ranks, 1 thread each, all-reducing one float per step instead of the gradient; "
                "and one rank alone through each DDP hook (the hooks' own computation)"},
        probe_step_ms=probe, hook_step_ms_b32=hook_ms)
