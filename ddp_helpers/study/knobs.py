"""DDP's own knobs at the design's settings (W=2, batch 32 per worker), side by side.

* ``bucket_cap_mb``: at the default 25 MiB the whole 2.27 MB gradient is one bucket, sent
  after backward has produced the last gradient; smaller buckets let the last layers'
  all-reduce start while backward still runs through the first layer.
* ``gradient_as_bucket_view``: gradients live in the buckets, one 2.27 MB copy a step fewer.
* ``static_graph``: DDP may skip re-checking which parameters were used.

Every setting runs once per round, in an order that rotates from round to round; each run
warms up for ``steps`` steps, then the mean over ``steps`` timed steps. Ratios are per round
against the default run of the same round, so that the host's drift cancels.
"""

from __future__ import annotations

import statistics
from typing import Callable

from ..config import TrainConfig
from ..launcher import launch
from .records import record

SETTINGS = {
    "default (25 MiB buckets)": {},
    "gradient_as_bucket_view": {"gradient_as_bucket_view": True},
    "bucket_cap_mb=1": {"bucket_cap_mb": 1.0},
    "bucket_cap_mb=0.25": {"bucket_cap_mb": 0.25},
    "static_graph": {"static_graph": True},
    "all three (view, 1 MiB, static)": {"gradient_as_bucket_view": True, "bucket_cap_mb": 1.0, "static_graph": True},
}


def run_knobs(quick: bool, log: Callable[[str], None]) -> dict:
    rounds, steps = (1, 20) if quick else (5, 300)
    base = TrainConfig(world_size=2, epochs=2, max_steps_per_epoch=steps, test_subset=500, lr_step=10,
                       train_subset=4096 if quick else 0, gradient_as_bucket_view=False,
                       comm="gloo")  # DDP's own all-reduce, as the method says: no communication hook
    names = list(SETTINGS)[:2] if quick else list(SETTINGS)
    ms = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            result = launch(base.replace(**SETTINGS[name]), live=False)
            ms[name].append(result.history[-1]["step_ms"]["total"])
            log(f"round {r + 1}/{rounds}  {name:<32} {ms[name][-1]:.3f} ms/step")
    default = ms[names[0]]
    rows = []
    for name in names:
        per_round = [x / d for x, d in zip(ms[name], default)]
        rows.append({"setting": name, "options": SETTINGS[name], "rounds_ms": ms[name],
                     "step_ms": statistics.median(ms[name]), "vs_default_rounds": per_round,
                     "vs_default_median": statistics.median(per_round),
                     "vs_default_range": [min(per_round), max(per_round)]})
    return record("study_knobs", quick, {
        "rounds": rounds, "warmup_steps": steps, "timed_steps": steps,
        "what": "DDP W=2, batch 32 per worker, gloo, 1 thread per rank; ratios per round against the default "
                "run of the same round (below 1 = faster)"}, rows=rows)
