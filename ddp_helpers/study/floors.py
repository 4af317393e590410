"""Compute only: how fast the step runs with no data, no synchronisation, no Python around it,
and how much a second process adds on this machine (the ``cores`` part)."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..dist import job_group
from ..place import RankPlace
from ..engine import make_optimizer
from ..model import MLP
from ..workers import run_workers
from .records import record

SLOT_GAP_S = 0.3  # pause between two slots, so that one slot's steps end before the next begins


@contextlib.contextmanager
def denormals_flushed():
    """Floor steps with denormal floats flushed to zero. The floor trains one model on one fixed
    batch for thousands of steps; as it memorises the batch, Adam's moments sink below float32's
    normal range, and arithmetic on such denormal numbers is several times slower on some CPUs (the
    cores part of 2026-12-07 slowed this way). Training on real data does not get there. Torch has no
    getter for the flag and the project sets it nowhere else, so it is switched off again after."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def floor_state(batch: int) -> tuple:
    """What the compute floor steps on: the model, fused Adam and one fixed random batch."""
    torch.manual_seed(0)
    model = MLP()
    optimizer, _ = make_optimizer(model.parameters(), 1e-3, 1e-5)
    return model, optimizer, torch.randn(batch, 784), torch.randint(0, 10, (batch,))


def floor_step(model, optimizer, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def compute_floor(batch: int, threads: int, steps: int, warmup: int) -> float:
    """Milliseconds per compute-floor step with ``threads`` threads: ``warmup`` steps, then the
    mean over ``steps`` (the statistic the training loop's step time uses too)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with denormals_flushed():
            state = floor_state(batch)
            for _ in range(warmup):
                floor_step(*state)
            start = time.perf_counter()
            for _ in range(steps):
                floor_step(*state)
            return 1000 * (time.perf_counter() - start) / steps
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class FloorSetup:
    """Who computes in one slot: rank 0 alone, or both ranks at once (1 thread each)."""

    name: str
    batch: int
    threads: int = 1
    both: bool = False


def _slots_job(place: RankPlace, emit: Callable, setups: list[FloorSetup], rounds: int, seconds: float,
               warmup: int) -> None:
    """Two long-lived processes take turns: in each slot the set-up's ranks run floor steps for
    ``seconds`` while the other rank sleeps. The set-ups rotate from round to round, so that a
    drift of the host hits all of them alike."""
    rank = place.rank
    with job_group(place, 120), denormals_flushed():
        states = {}
        for s in setups:  # every model, optimizer and batch built and warmed up before the first slot
            if (rank == 0 or s.both) and (s.batch, s.threads) not in states:
                torch.set_num_threads(s.threads)
                states[s.batch, s.threads] = floor_state(s.batch)
                for _ in range(warmup):
                    floor_step(*states[s.batch, s.threads])
        start = torch.tensor([time.time() + 0.5], dtype=torch.float64)
        torch.distributed.broadcast(start, src=0)  # one clock for both
        out = []
        for r in range(rounds):
            for i in range(len(setups)):
                s = setups[(i + r) % len(setups)]
                slot_start = start.item() + (r * len(setups) + i) * (seconds + SLOT_GAP_S)
                while time.time() < slot_start:
                    time.sleep(0.0005)
                if rank != 0 and not s.both:
                    continue
                torch.set_num_threads(s.threads)
                times = []
                while time.time() < slot_start + seconds:
                    step_start = time.perf_counter()
                    floor_step(*states[s.batch, s.threads])
                    times.append(time.perf_counter() - step_start)
                times = times[3:]  # the first steps after a switch of threads and batch are not timed
                out.append({"round": r, "setup": s.name, "ms": 1000 * statistics.median(times) if times else None})
        emit("result", out)


def floor_slots(setups: list[FloorSetup], rounds: int, seconds: float, warmup: int = 10) -> dict[str, list[float]]:
    """Floor step ms of each set-up, one value per round (for a pair: its slower rank)."""
    timeout = 120 + rounds * len(setups) * (seconds + SLOT_GAP_S)
    got = run_workers(_slots_job, 2, (setups, rounds, seconds, warmup), launch_timeout_s=timeout)
    slowest: dict[tuple[int, str], float] = {}
    for rows in got.values():
        for row in rows:
            if row["ms"] is not None:
                key = row["round"], row["setup"]
                slowest[key] = max(slowest.get(key, 0.0), row["ms"])
    return {s.name: [slowest[r, s.name] for r in range(rounds) if (r, s.name) in slowest] for s in setups}


def run_cores(quick: bool, log: Callable[[str], None]) -> dict:
    """One 1-thread process alone, two at once, and one 2-thread process at twice the batch (the
    same samples as the pair), in interleaved slots. The pair against the 2-thread process is the
    ceiling for any 2-worker strategy against one process on this machine."""
    rounds, seconds = (1, 0.3) if quick else (12, 2.0)
    batches = (32, 128, 256)
    setups = [s for b in batches for s in (FloorSetup(f"alone b{b}", b), FloorSetup(f"pair b{b}", b, both=True),
                                           FloorSetup(f"2 threads b{2 * b}", 2 * b, threads=2))]
    times = floor_slots(setups, rounds, seconds)
    rows = []
    for b in batches:
        alone, pair, double = times[f"alone b{b}"], times[f"pair b{b}"], times[f"2 threads b{2 * b}"]
        ceiling = [d / p for d, p in zip(double, pair)]  # per round: same moment, same statistic
        rows.append({"batch": b, "alone_ms": statistics.median(alone), "pair_ms": statistics.median(pair),
                     "two_threads_double_batch_ms": statistics.median(double),
                     "pair_vs_alone_throughput": 2 * statistics.median(alone) / statistics.median(pair),
                     "ceiling_rounds": ceiling, "ceiling_median": statistics.median(ceiling),
                     "ceiling_range": [min(ceiling), max(ceiling)],
                     "rounds_ms": {"alone": alone, "pair": pair, "two_threads_double_batch": double}})
        log(f"b{b}: two 1-thread processes vs one 2-thread process at b{2 * b}: median of per-round ratios "
            f"{rows[-1]['ceiling_median']:.2f}x (rounds {min(ceiling):.2f}-{max(ceiling):.2f})")
    return record("study_cores", quick, {
        "rounds": rounds, "seconds_per_slot": seconds,
        "what": "forward + backward + fused Adam on a fixed batch (no data, no sync) in two long-lived processes "
                "taking turns in slots: one 1-thread process alone, two at once (the slower counts), one 2-thread "
                "process at twice the batch; set-ups rotated from round to round",
        "ceiling": "per round, 2-thread step at 2B / pair step at B (the same samples); median and range of rounds",
        "denormals": "flushed to zero while the floor steps run (denormals_flushed)"},
        rows=rows)
