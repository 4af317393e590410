"""The headline ratio with its spread: one process against DDP, interleaved.

One pair of runs gives one ratio, and on a shared host the next pair can differ by tens of
percent. So every configuration trains one epoch per round, ``rounds`` times, the order rotated
from round to round so that each goes first as often as the others; each ratio is taken within
its round (against the reference's epoch of the same round). And one such run's median still
moves from run to run (four runs of five rounds once gave 1.57, 1.50, 1.40 and 1.22), so the
whole run is repeated ``runs`` times. The statistic, declared before any run: the median of every
per-round ratio pooled over the runs, with their range; each run's own median is shown beside it.
"""

from __future__ import annotations

import statistics

import pandas as pd

from ..config import TrainConfig
from ..launcher import launch
from ..results import header
from ..study.records import per_round, rotated


def interleaved(configs: dict[str, TrainConfig], rounds: int, reference: str, runs: int = 1,
                fresh_process: bool = True) -> dict:
    """A self-describing record: ``runs`` x ``rounds`` x one epoch of every configuration, the order
    rotated, and per round each configuration's epoch time over the reference's. ``fresh_process``:
    one process in a spawned worker too, like DDP's ranks (False only where the timing does not matter)."""
    names, rows = list(configs), []
    for run in range(runs):
        for r in range(rounds):
            order = rotated(names, r)
            times = {}
            for name in order:
                # every configuration in fresh spawned workers, one process too: alike start-up and state
                epoch = launch(configs[name].replace(epochs=1), live=False, fresh_process=fresh_process).history[0]
                times[name] = {"epoch_s": epoch["epoch_time_s"], "step_ms": epoch["step_ms"]["total"],
                               "sync_fraction": epoch["sync_fraction"]}
            rows.append({"run": run + 1, "round": r + 1, "order": order, "times": times,
                         "ratios": {n: times[n]["epoch_s"] / times[reference]["epoch_s"]
                                    for n in names if n != reference}})
    summary = {}
    for name in names:
        if name != reference:
            ratios = [row["ratios"][name] for row in rows]
            per_run = [statistics.median(row["ratios"][name] for row in rows if row["run"] == run + 1)
                       for run in range(runs)]
            summary[name] = {**per_round(ratios), "run_medians": per_run}
    method = {"runs": runs, "rounds": rounds,
              "timed": "one epoch each, training time only (evaluation and start-up excluded)",
              "processes": "every run in freshly spawned workers, the one-process configuration too" if fresh_process
                           else "one process in the calling process, DDP in spawned workers",
              "order": "rotated by one configuration each round",
              "ratio": f"epoch time / {reference}'s, per round",
              "statistic": "declared before the runs: the median of all per-round ratios pooled over the runs, "
                           "with their range; each run's median beside it"}
    return header("pairs", quick=False, method=method, reference=reference,
                  configs={name: cfg.to_dict() for name, cfg in configs.items()}, rows=rows, summary=summary)


def rounds_table(pairs: dict) -> pd.DataFrame:
    """Every round's epoch times and which configuration ran first."""
    return pd.DataFrame([{"run": r["run"], "round": r["round"], "ran first": r["order"][0],
                          **{f"{n}, s": t["epoch_s"] for n, t in r["times"].items()}}
                         for r in pairs["rows"]]).set_index(["run", "round"]).round(2)
