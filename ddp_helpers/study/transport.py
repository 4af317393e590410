"""The same-host transport against gloo, side by side in one run (part ``transport``).

1. The bare all-reduce of the gradient (567,434 float32, 2.27 MB) at 2 ranks and at 4 ranks
   (oversubscribed on 2 vCPUs), gloo and shared memory alternating which goes first from round to
   round; and the memory-copy floor, timed alone: one core copying that buffer three times (in,
   its share reduced, out), the work of the shared-memory all-reduce.
2. Training steps of our loop at W=2 (batch 32 per rank) against the ceiling (two processes that
   never synchronise) and one 2-thread process, the cases rotated from round to round; ratios
   taken round by round.
3. Time to 98% of a shared-memory configuration declared here, before the run, against one process
   at the same global batch, over several seeds.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..data import ensure_mnist
from ..dist import job_group, job_store
from ..launcher import launch
from ..place import RankPlace
from ..transport import Gloo, SharedMemory
from ..workers import run_workers
from .comm import GRAD_BYTES
from .records import per_round, record, rotated
from .throughput import Case, measure
from .tta import TARGET, spread, time_to_target

NUMEL = GRAD_BYTES // 4

STEP_CASES = [
    Case("w1_2t", "1 process, 2 threads", "train", TrainConfig(world_size=1, threads_per_rank=2)),
    Case("ceiling", "2 processes, no synchronisation (the ceiling)", "train",
         TrainConfig(world_size=2, sync="local_sgd", local_sgd_every=10**9)),
    Case("ddp_gloo", "DDP, gloo", "train", TrainConfig(world_size=2, comm="gloo")),
    Case("ddp_shm", "DDP, shared memory", "train", TrainConfig(world_size=2, comm="shm")),
    Case("ddp_shm_view", "DDP, shared memory, gradient_as_bucket_view", "train",
         TrainConfig(world_size=2, comm="shm", gradient_as_bucket_view=True)),
    Case("bucketed_gloo", "from-scratch DDP, gloo", "train", TrainConfig(world_size=2, sync="bucketed", comm="gloo")),
    Case("bucketed_shm", "from-scratch DDP, shared memory", "train",
         TrainConfig(world_size=2, sync="bucketed", comm="shm")),
    Case("bucketed_shm_2b", "from-scratch DDP, shared memory, 0.25 MiB buckets (2)", "train",
         TrainConfig(world_size=2, sync="bucketed", comm="shm", bucket_cap_mb=0.25)),
    Case("localsgd8_shm", "local SGD k=8, shared memory", "train",
         TrainConfig(world_size=2, sync="local_sgd", comm="shm")),
]
# declared before the run: the global batch at which the all-reduce is paid once per 256 samples
TTA_PAIR = {"1 process, 2 threads, b256": TrainConfig(world_size=1, threads_per_rank=2, batch_size=256, lr=2e-3,
                                                      warmup_steps=100),
            "DDP W=2 over shared memory, b128 each": TrainConfig(world_size=2, batch_size=128, lr=2e-3,
                                                                 warmup_steps=100, comm="shm")}


def memcopy_floor_ms(rounds: int, repeats: int) -> list[float]:
    """Per round, the median ms of one core copying the gradient-sized buffer three times."""
    torch.set_num_threads(1)
    a, b = torch.randn(NUMEL), torch.empty(NUMEL)
    out = []
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            b.copy_(a)
            a.copy_(b)
            b.copy_(a)
            times.append(time.perf_counter() - start)
        out.append(1000 * statistics.median(times))
    return out


BACK_TO_BACK = 20


def _bare_job(place: RankPlace, emit: Callable, rounds: int, repeats: int) -> None:
    """Per round and transport (the order alternating): the median ms of an all-reduce of the gradient
    started together (a barrier before each: it includes the ranks' skew on leaving the barrier), and
    the mean ms of BACK_TO_BACK all-reduces one after the other (the steady state)."""
    torch.set_num_threads(1)
    with job_group(place, 120):
        transports = {"gloo": Gloo(), "shm": SharedMemory(job_store(place, 120), place.rank, [0] * place.world_size,
                                                          timeout_s=120)}
        base, tensor = torch.randn(NUMEL), torch.empty(NUMEL)
        out: dict[str, list[float]] = {"gloo": [], "shm": [], "gloo_back_to_back": [], "shm_back_to_back": []}
        for r in range(rounds):
            for name in (("gloo", "shm") if r % 2 == 0 else ("shm", "gloo")):
                times = []
                for i in range(5 + repeats):  # 5 untimed first
                    tensor.copy_(base)
                    dist.barrier()  # all start together
                    start = time.perf_counter()
                    transports[name].all_reduce_(tensor)
                    if i >= 5:
                        times.append(time.perf_counter() - start)
                out[name].append(1000 * statistics.median(times))
                tensor.copy_(base)  # the sums double each time: 2**20 times the values stays finite
                dist.barrier()
                start = time.perf_counter()
                for _ in range(BACK_TO_BACK):
                    transports[name].all_reduce_(tensor)
                out[f"{name}_back_to_back"].append(1000 * (time.perf_counter() - start) / BACK_TO_BACK)
        transports["shm"].close()
        if place.rank == 0:
            emit("result", out)


def run_transport(quick: bool, log: Callable[[str], None]) -> dict:
    root = str(ensure_mnist())
    rounds, repeats, steps = (2, 10, 20) if quick else (6, 50, 300)
    floor = memcopy_floor_ms(rounds, repeats)
    log(f"memory-copy floor (3 copies of {GRAD_BYTES / 1e6:.2f} MB, one core): {statistics.median(floor):.3f} ms")
    bare = {}
    for world_size in (2, 4):
        got = run_workers(_bare_job, world_size, (rounds, repeats), launch_timeout_s=900)[0]
        ratios = {f"gloo_over_shm{k}_rounds": [g / s for g, s in zip(got[f"gloo{k}"], got[f"shm{k}"])]
                  for k in ("", "_back_to_back")}
        bare[str(world_size)] = {**got, **ratios, "median_ms": {k: statistics.median(v) for k, v in got.items()},
                                 "oversubscribed": world_size > 2}
        log(f"W={world_size}: gloo {statistics.median(got['gloo']):.3f} ms, shared memory "
            f"{statistics.median(got['shm']):.3f} ms; back to back {statistics.median(got['gloo_back_to_back']):.3f} "
            f"and {statistics.median(got['shm_back_to_back']):.3f} ms")
    cases = STEP_CASES if not quick else [c for c in STEP_CASES if c.id in ("w1_2t", "ceiling", "ddp_shm")]
    measured: dict[str, list[dict]] = {c.id: [] for c in cases}
    orders = []
    for r in range(rounds):
        order = rotated(cases, r)  # each case first in its own round
        orders.append([c.id for c in order])
        for case in order:
            cfg = case.cfg.replace(train_subset=4096 if quick else 0)
            measured[case.id].append(measure(Case(case.id, case.label, case.kind, cfg), steps, root))
            log(f"round {r + 1}/{rounds}  {case.label:<52} {measured[case.id][-1]['ms']:7.3f} ms/step")
    rows = {}
    for case in cases:
        ms = [m["ms"] for m in measured[case.id]]
        samples_per_s = [1000 * case.world_size * 32 / v for v in ms]
        rows[case.id] = {"id": case.id, "label": case.label, "world_size": case.world_size, "config": case.cfg.to_dict(),
                         "rounds_ms": ms, "step_ms": statistics.median(ms), "samples_per_s_rounds": samples_per_s,
                         "split_ms_rounds": [m["split_ms"] for m in measured[case.id]],
                         "threads_per_rank": measured[case.id][0]["threads"],
                         "peak_rss_mib_per_rank": measured[case.id][0]["peak_rss_mib_per_rank"]}
    for row in rows.values():  # samples per second against the same round's ceiling and one process
        for ref in ("ceiling", "w1_2t"):
            ratios = [a / b for a, b in zip(row["samples_per_s_rounds"], rows[ref]["samples_per_s_rounds"])]
            row[f"vs_{ref}"] = per_round(ratios)
    tta = run_tta_pair(quick, log)
    return record("study_transport", quick, {
        "rounds": rounds, "bare_repeats": repeats, "steps": f"our loop: epoch 1 warms up, epoch 2 is timed, each cut at "
                                                           f"{steps} steps",
        "order": "bare all-reduce: gloo and shm alternate which goes first; steps: the case list rotated by one each "
                 "round, so that every case goes first once",
        "statistic": "per round: median of the repeats (bare) or mean step time of the timed steps (our loop); "
                     "ratios taken round by round against the same round's reference, then their median",
        "memcopy_floor": "one process, one thread: dst.copy_(src) three times on a 2.27 MB buffer, timed alone",
        "tta": f"declared before the run: {list(TTA_PAIR)}; {TARGET:.0%} target, 8 validation passes per epoch",
        "processes": "every case and race run in freshly spawned workers, the single process too"},
        memcopy_floor_ms=floor, bare_allreduce=bare, orders=orders, cases=list(rows.values()), tta=tta)


def run_tta_pair(quick: bool, log: Callable[[str], None]) -> dict:
    """Time to the target of the declared pair, seed by seed (the pair's order alternating)."""
    seeds = (0,) if quick else (0, 1, 2, 3, 4)
    common = dict(stop_at_accuracy=TARGET, epochs=1 if quick else 8, evals_per_epoch=8,
                  train_subset=4096 if quick else 0, test_subset=1000 if quick else 0)
    runs: dict[str, list[dict]] = {name: [] for name in TTA_PAIR}
    for seed in seeds:
        names = list(TTA_PAIR) if seed % 2 == 0 else list(TTA_PAIR)[::-1]
        for name in names:
            result = launch(TTA_PAIR[name].replace(seed=seed, **common), live=False, fresh_process=True)
            got = {"seed": seed, **time_to_target(result.history),
                   "peak_rss_mib_per_rank": result.record["runtime"]["peak_rss_mib_per_rank"]}
            runs[name].append(got)
            log(f"seed {seed}  {name:<40} " + (f"{TARGET:.0%} at epoch {got['epochs_to_target']:.2f}, "
                                              f"{got['seconds_to_target']:.1f} s" if got["reached"] else "not reached"))
    one, two = list(TTA_PAIR)
    ratios = [a["seconds_to_target"] / b["seconds_to_target"] for a, b in zip(runs[one], runs[two])
              if a["reached"] and b["reached"]]
    return {"configs": {name: cfg.to_dict() for name, cfg in TTA_PAIR.items()}, "seeds": list(seeds), "runs": runs,
            "one_over_two": spread(ratios) if ratios else None,
            "accuracy_at_target": {name: [next(p["val_accuracy"] for p in r["points"] if p["val_accuracy"] >= TARGET)
                                          if r["reached"] else None for r in rs] for name, rs in runs.items()}}
