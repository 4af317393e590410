"""The headline ratio with its spread: one process against DDP in interleaved pairs, one run.

One pair of runs gives one ratio, and on a shared host the next pair can differ by tens of
percent. So the two configurations run one epoch each, ``pairs`` times, alternating which
goes first, and the record keeps every pair's epoch times; the ratio is quoted as the median
over pairs with its range.
"""

from __future__ import annotations

import statistics

from ..config import TrainConfig
from ..launcher import launch
from ..results import header


def interleaved_pairs(one: TrainConfig, ddp: TrainConfig, pairs: int) -> dict:
    """A self-describing record: ``pairs`` x (one epoch of ``one``, one epoch of ``ddp``), the
    order alternating, and the per-pair ratio of DDP's epoch time to the single process's."""
    rows = []
    for i in range(pairs):
        order = (("one", one), ("ddp", ddp)) if i % 2 == 0 else (("ddp", ddp), ("one", one))
        times = {}
        for name, cfg in order:
            epoch = launch(cfg.replace(epochs=1), live=False).history[0]
            times[name] = {"epoch_s": epoch["epoch_time_s"], "step_ms": epoch["step_ms"]["total"],
                           "sync_fraction": epoch["sync_fraction"]}
        rows.append({"pair": i + 1, "first": order[0][0], **{f"{k}_{n}": v[k] for n, v in times.items() for k in v},
                     "ratio": times["ddp"]["epoch_s"] / times["one"]["epoch_s"]})
    ratios = [row["ratio"] for row in rows]
    method = {"pairs": pairs, "timed": "one epoch each, training time only, the order alternating",
              "ratio": "DDP's epoch time / one process's"}
    return header("pairs", quick=False, method=method, configs={"one": one.to_dict(), "ddp": ddp.to_dict()}, pairs=rows,
                  summary={"ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                           "ratio_max": max(ratios), "pairs": pairs})
