"""Time to 98% validation accuracy: three single-process settings against three two-worker
settings, declared before the run (an equal number on each side, so that picking the best
of each side favours neither), run in an order rotated by one for every seed.

Seconds are training time only: process start, data loading and the validation passes
(4 per epoch, at equal step intervals) are excluded on both sides. A run stops at the end of
the epoch in which a validation pass first reaches the target.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

from ..config import TrainConfig
from ..launcher import launch
from .records import record, rotated

TARGET = 0.98
LARGE = dict(lr=2e-3, warmup_steps=100)    # global batch 256
LARGER = dict(lr=4e-3, warmup_steps=100)   # global batch 512: twice the rate (linear scaling)
# (single process, two workers) at the same global batch, except the design's own settings
PAIRS = {
    "design's settings": (dict(world_size=1, threads_per_rank=2, batch_size=32),
                          dict(world_size=2, batch_size=32)),
    "global batch 256": (dict(world_size=1, threads_per_rank=2, batch_size=256, **LARGE),
                         dict(world_size=2, batch_size=128, **LARGE)),
    "global batch 512": (dict(world_size=1, threads_per_rank=2, batch_size=512, **LARGER),
                         dict(world_size=2, batch_size=256, sync="local_sgd", local_sgd_every=8, **LARGER)),
}


def settings(quick: bool) -> dict[str, TrainConfig]:
    """The six settings; with ``quick``, one pair on a data subset (a smoke run for CI)."""
    common = dict(stop_at_accuracy=TARGET, epochs=1 if quick else 8, evals_per_epoch=4, comm="gloo",
                  train_subset=4096 if quick else 0, test_subset=1000 if quick else 0)
    out = {}
    for pair, (single, two) in list(PAIRS.items())[-1:] if quick else PAIRS.items():
        out[f"1 process, 2 threads: {pair}"] = TrainConfig(**common, **single)
        out[f"2 workers: {pair}"] = TrainConfig(**common, **two)
    return out


def time_to_target(history: list[dict], target: float = TARGET) -> dict:
    """The first validation pass that reaches the target: epochs (fractional) and training seconds."""
    points, before = [], 0.0
    for row in history:
        for e in row["evals"]:
            points.append({"epoch": row["epoch"] - 1 + e["epoch_fraction"], "train_s": before + e["train_time_s"],
                           "val_accuracy": e["val_accuracy"]})
        before += row["epoch_time_s"]
    hit = next((p for p in points if p["val_accuracy"] >= target), None)
    return {"reached": hit is not None, "epochs_to_target": hit and hit["epoch"],
            "seconds_to_target": hit and hit["train_s"], "points": points}


def decompose(single: dict, two: dict, single_cfg: dict, two_cfg: dict) -> dict:
    """ratio = single's seconds / two's = samples x compute x sync, all measured in the two runs:
    samples the single process needed / the pair needed; the single process's time per sample
    / the pair's without its synchronisation; and 1 - the pair's synchronisation share."""
    def samples(run, cfg):
        return run["epochs_to_target"] * run["steps_per_epoch"] * cfg["batch_size"] * cfg["world_size"]

    used = range(math.ceil(two["epochs_to_target"]))  # the epochs (partly) run before the target
    sync = (sum(two["sync_fraction"][i] * two["epoch_time_s"][i] for i in used)
            / sum(two["epoch_time_s"][i] for i in used))
    per_sample = {k: run["seconds_to_target"] / samples(run, cfg)
                  for k, run, cfg in (("single", single, single_cfg), ("two", two, two_cfg))}
    return {"ratio": single["seconds_to_target"] / two["seconds_to_target"],
            "samples": samples(single, single_cfg) / samples(two, two_cfg),
            "compute": per_sample["single"] / (per_sample["two"] * (1 - sync)), "sync": 1 - sync,
            "sync_share": sync}


def interval_at_target(run: dict) -> float:
    """Training seconds between the validation pass that reached the target and the one before it."""
    hit = next(i for i, p in enumerate(run["points"]) if p["train_s"] == run["seconds_to_target"])
    return run["points"][hit]["train_s"] - (run["points"][hit - 1]["train_s"] if hit else 0.0)


def seed_winner(single: dict, two: dict) -> str:
    """'single', 'two_workers' or 'tie' for one seed: a side wins only when it reached the target
    more than one validation interval (the wider of the two runs') before the other."""
    if not (single["reached"] and two["reached"]):
        return "two_workers" if two["reached"] else "single" if single["reached"] else "tie"
    gap = single["seconds_to_target"] - two["seconds_to_target"]
    if abs(gap) <= max(interval_at_target(single), interval_at_target(two)):
        return "tie"
    return "two_workers" if gap > 0 else "single"


def pair_verdict(singles: list[dict], twos: list[dict]) -> str:
    """The declared rule over the seeds: a side wins the pair only when it wins every seed; else a tie."""
    winners = {seed_winner(a, b) for a, b in zip(singles, twos)}
    return winners.pop() if len(winners) == 1 and "tie" not in winners else "tie"


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "values": values}


def run_tta(quick: bool, log: Callable[[str], None]) -> dict:
    configs, seeds = settings(quick), (0,) if quick else (0, 1, 2, 3, 4)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    orders = {}
    for turn, seed in enumerate(seeds):  # each setting runs first, second, ... in turn
        order = rotated(list(configs), turn)
        orders[str(seed)] = order
        for name in order:
            result = launch(configs[name].replace(seed=seed), live=False, fresh_process=True)
            hist = result.history
            got = {"seed": seed, **time_to_target(hist), "wall_time_s": result.record["runtime"]["wall_time_s"],
                   "epoch_time_s": [r["epoch_time_s"] for r in hist], "steps_per_epoch": hist[0]["steps_per_worker"],
                   "sync_fraction": [r["sync_fraction"] for r in hist]}
            runs[name].append(got)
            log(f"seed {seed}  {name:<44} " + (f"98% at epoch {got['epochs_to_target']:.2f}, "
                                               f"{got['seconds_to_target']:.1f} s" if got["reached"]
                                               else "not reached"))
    summary = {name: {"config": configs[name].to_dict(), "reached": sum(r["reached"] for r in rs), "seeds": len(rs),
                      "seconds": spread([r["seconds_to_target"] for r in rs]) if all(r["reached"] for r in rs)
                      else None}
               for name, rs in runs.items()}
    pairs = {}
    for pair in PAIRS:
        one, two = f"1 process, 2 threads: {pair}", f"2 workers: {pair}"
        if one in summary and summary[one]["seconds"] and summary[two]["seconds"]:
            per_seed = [decompose(a, b, configs[one].to_dict(), configs[two].to_dict())
                        for a, b in zip(runs[one], runs[two])]
            pairs[pair] = {"single": one, "two_workers": two, "per_seed": per_seed,
                           "ratio": spread([d["ratio"] for d in per_seed])}
    complete = [n for n, s in summary.items() if s["seconds"]]
    best = {side: min((n for n in complete if n.startswith(prefix)), key=lambda n: summary[n]["seconds"]["mean"],
                      default=None) for side, prefix in (("single", "1 process"), ("two_workers", "2 workers"))}
    if all(best.values()):
        per_seed = [a["seconds_to_target"] / b["seconds_to_target"]
                    for a, b in zip(runs[best["single"]], runs[best["two_workers"]])]
        best["ratio"] = spread(per_seed)
    return record("study_tta", quick, {
        "target": TARGET, "evals_per_epoch": 4, "seeds": list(seeds), "orders": orders,
        "seconds": "training time only, to the first validation pass at or above the target (process start, data "
                   "loading and evaluation excluded on both sides)",
        "settings": "3 single-process and 3 two-worker settings declared before the run; "
                    "order rotated by one per seed",
        "transport": "gloo between the two workers (pinned; the transport part races shared memory)",
        "processes": "every run in freshly spawned workers, the single process too"},
        runs=runs, summary=summary, pairs=pairs, best=best)
