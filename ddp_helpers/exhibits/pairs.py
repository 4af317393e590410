"""The headline ratio with its spread: one process against DDP, interleaved, in one run of the cell.

One pair of runs gives one ratio, and on a shared host the next pair can differ by tens of
percent. So every configuration trains one epoch per round, ``rounds`` times, the order rotated
from round to round so that each goes first as often as the others; the record keeps every epoch
time, each ratio is taken within its round (against the reference's epoch of the same round), and
the ratios are quoted as their median over the rounds with their range.
"""

from __future__ import annotations

import statistics

from ..config import TrainConfig
from ..launcher import launch
from ..results import header


def interleaved(configs: dict[str, TrainConfig], rounds: int, reference: str) -> dict:
    """A self-describing record: ``rounds`` x one epoch of every configuration, the order rotated, and
    per round each configuration's epoch time over the reference's."""
    names, rows = list(configs), []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        times = {}
        for name in order:
            epoch = launch(configs[name].replace(epochs=1), live=False).history[0]
            times[name] = {"epoch_s": epoch["epoch_time_s"], "step_ms": epoch["step_ms"]["total"],
                           "sync_fraction": epoch["sync_fraction"]}
        rows.append({"round": r + 1, "order": order, "times": times,
                     "ratios": {n: times[n]["epoch_s"] / times[reference]["epoch_s"] for n in names if n != reference}})
    summary = {}
    for name in names:
        if name != reference:
            ratios = [row["ratios"][name] for row in rows]
            summary[name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                             "rounds": ratios}
    method = {"rounds": rounds, "timed": "one epoch each, training time only (evaluation and start-up excluded)",
              "order": "rotated by one configuration each round", "ratio": f"epoch time / {reference}'s, per round; "
                                                                         "the median over rounds"}
    return header("pairs", quick=False, method=method, reference=reference,
                  configs={name: cfg.to_dict() for name, cfg in configs.items()}, rows=rows, summary=summary)
