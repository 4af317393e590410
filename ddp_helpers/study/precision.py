"""bf16-mixed against float32 on this CPU, side by side: one process (2 threads) and DDP W=2.

Autocast runs the linear layers' matrix products in bfloat16; weights, gradients, the all-reduce
and Adam stay in float32. Whether that pays depends on the CPU: with native bf16 instructions
(AVX512_BF16, AMX) a product in bf16 is cheaper; without them the CPU converts and computes in
float32, and the casts are pure cost. The record says which this CPU is.

Every case runs once per round, in an order that rotates from round to round; each run warms up
for ``steps`` steps (epoch 1), then the mean over ``steps`` timed steps (epoch 2). Ratios are per
round, bf16-mixed over float32 of the same world size.
"""

from __future__ import annotations

import statistics
from typing import Callable

from ..config import TrainConfig
from ..host import native_bf16
from ..launcher import launch
from .records import per_round, record

CASES = {
    "1 process, float32": {"world_size": 1, "threads_per_rank": 2},
    "1 process, bf16-mixed": {"world_size": 1, "threads_per_rank": 2, "precision": "bf16-mixed"},
    "DDP W=2, float32": {"world_size": 2},
    "DDP W=2, bf16-mixed": {"world_size": 2, "precision": "bf16-mixed"},
}


def run_precision(quick: bool, log: Callable[[str], None]) -> dict:
    rounds, steps = (1, 20) if quick else (5, 300)
    base = TrainConfig(epochs=2, max_steps_per_epoch=steps, test_subset=2000, lr_step=10,
                       train_subset=4096 if quick else 0)
    names = list(CASES)
    ms: dict[str, list[float]] = {name: [] for name in names}
    val: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            result = launch(base.replace(**CASES[name]), live=False, fresh_process=True)
            ms[name].append(result.history[-1]["step_ms"]["total"])
            val[name].append(result.history[-1]["val_accuracy"])
            log(f"round {r + 1}/{rounds}  {name:<24} {ms[name][-1]:.3f} ms/step")
    rows = [{"case": name, "options": CASES[name], "rounds_ms": ms[name], "step_ms": statistics.median(ms[name]),
             "val_accuracy_after_timed_steps": val[name]} for name in names]
    ratios = {}
    for where in ("1 process", "DDP W=2"):
        ratios[where] = per_round([b / f for b, f in zip(ms[f"{where}, bf16-mixed"], ms[f"{where}, float32"])])
    return record("study_precision", quick, {
        "rounds": rounds, "warmup_steps": steps, "timed_steps": steps,
        "what": "batch 32 per rank, the design's model; step time = mean over the timed steps; ratio = "
                "bf16-mixed over float32 of the same world size, per round (below 1 = bf16-mixed faster)",
        "native_bf16": native_bf16(), "processes": "every run in freshly spawned workers, one process too"},
        rows=rows, bf16_over_float32=ratios)
