"""GPU: our training loop on one GPU against the fastest that GPU runs the same step.

The floor is the design's step (batch 32, forward, backward, fused Adam) on one fixed
batch already on the GPU, captured once as a CUDA graph and replayed back to back: no
data indexing, no Python per kernel. Our loop is measured in the same run, with the
graph on (the default) and off, and the floors before and after it.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from ..config import TrainConfig
from ..cuda_graph import GraphedStep
from ..data import TRAIN_SAMPLES, steps_per_epoch
from ..engine import Tally, make_optimizer
from ..launcher import launch
from ..model import MLP
from ..sync import make_sync
from .records import record


def _timed(fn: Callable[[], None], steps: int) -> float:
    """Seconds per call of ``fn``, timed with CUDA events around ``steps`` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / steps


def step_floors(batch: int, steps: int) -> dict[str, float]:
    """Seconds per step of the captured step (graph) and of a tight eager loop, same batch."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    x, y = torch.randn(batch, 784, device=device), torch.randint(0, 10, (batch,), device=device)
    model = MLP().to(device)
    optimizer, _ = make_optimizer(model.parameters(), 1e-3, 1e-5, capturable=True)
    graphed = GraphedStep(make_sync("ddp", model, optimizer, 1, device), optimizer, Tally(device), x, y)
    _timed(lambda: graphed.step(x, y), 50)  # warm-up
    graph_s = _timed(lambda: graphed.step(x, y), steps)

    def eager() -> None:
        optimizer.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    _timed(eager, 50)
    return {"graph_s": graph_s, "eager_s": _timed(eager, steps)}


def run_gpu(quick: bool, log: Callable[[str], None]) -> dict | None:
    if not torch.cuda.is_available():
        log("gpu: no CUDA device here; nothing measured")
        return None
    epochs, floor_steps = (1, 200) if quick else (5, 1875)
    subset = 8192 if quick else 0
    per_epoch = steps_per_epoch(subset or TRAIN_SAMPLES, 1, 32)
    floors = [step_floors(32, floor_steps)]
    runs = {}
    configs = {
        "W=1, CUDA graph (default)": TrainConfig(world_size=1, epochs=epochs, train_subset=subset),
        "W=1, eager": TrainConfig(world_size=1, epochs=min(epochs, 2), train_subset=subset, cuda_graph=False),
        "W=1 on this machine's CPU cores": TrainConfig(world_size=1, epochs=1, train_subset=subset, device="cpu"),
        "W=2 over gloo on the one GPU": TrainConfig(world_size=2, epochs=1, train_subset=subset, backend="gloo",
                                                   device="cuda"),
    }
    for name, cfg in configs.items():
        result = launch(cfg, live=False)
        runs[name] = {"config": cfg.to_dict(), "runtime": result.record["runtime"], "epochs": result.history,
                      "summary": result.record["summary"]}
        log(f"{name:<34} median epoch {result.record['summary']['median_epoch_time_s']:.3f} s, "
            f"final accuracy {result.record['summary']['final_val_accuracy']:.2%}")
    floors.append(step_floors(32, floor_steps))
    floor_epoch = [f["graph_s"] * per_epoch for f in floors]
    ours = runs["W=1, CUDA graph (default)"]["summary"]["median_epoch_time_s"]
    out = record("bench_gpu", quick, {
        "floor": f"the step on one fixed batch of 32 on the GPU, captured as a CUDA graph and replayed {floor_steps} "
                 "times, timed with CUDA events; measured before and after the training runs",
        "epoch": f"{per_epoch} steps of batch 32", "ours": "median training seconds per epoch (evaluation excluded)"},
        floors=floors, floor_epoch_s=floor_epoch, runs=runs,
        ours_vs_graph_floor=ours / statistics.median(floor_epoch),
        ours_vs_graph_floor_range=[ours / max(floor_epoch), ours / min(floor_epoch)])
    log(f"graph floor {min(floor_epoch):.3f}-{max(floor_epoch):.3f} s/epoch; ours {ours:.3f} s/epoch "
        f"= {out['ours_vs_graph_floor']:.2f}x the floor")
    return out
