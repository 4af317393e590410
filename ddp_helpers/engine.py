"""The training step and the evaluation pass, shared by the baseline and every DDP variant.

Nothing here knows how many processes there are: communication comes in through the
sync strategy (gradients) and a ``reduce`` function (metric sums across ranks).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Split, batches

PHASES = ("data", "compute", "sync", "optimizer")
Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(sums: torch.Tensor) -> torch.Tensor:
    return sums


def make_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float,
                   ) -> tuple[torch.optim.Optimizer, str]:
    """Adam in its fastest available form: fused (one kernel for all tensors), else foreach."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True), "fused"
    except (RuntimeError, TypeError):  # older torch, or a device without a fused kernel
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True), "foreach"


class PhaseTimer:
    """Wall-clock seconds per phase of a step. On CUDA it synchronises at phase ends,
    which costs a little speed but makes the split honest."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._last = time.perf_counter()

    def lap(self, phase: str) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        self.seconds[phase] += elapsed
        return elapsed


def train_one_epoch(sync, optimizer: torch.optim.Optimizer, split: Split, indices: torch.Tensor,
                    batch_size: int, *, reduce: Reduce = no_reduce, max_steps: int = 0,
                    accumulation_steps: int = 1, lr_scale: Callable[[int], float] | None = None,
                    before_step: Callable[[int], None] | None = None, step_offset: int = 0) -> dict:
    """One pass over this rank's indices. Returns global loss/accuracy and the time split.

    ``sync`` decides how gradients (or weights) are agreed on; ``reduce`` sums the
    metric counters over ranks. Every ``accumulation_steps`` micro-batches make one
    optimizer step; the others run under ``sync.no_sync()``. ``lr_scale(step)`` scales
    the learning rate per optimizer step (warm-up); ``before_step(micro_step)`` is a
    hook for fault injection and progress. ``max_steps`` caps the micro-batches.
    """
    module = sync.module
    module.train()
    device = split.images.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n_batches = -(-len(indices) // batch_size)
    if max_steps:
        n_batches = min(n_batches, max_steps)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    seen = micro = optimizer_steps = 0
    timer = PhaseTimer(device)
    start = time.perf_counter()
    sync.pop_seconds()
    for x, y in batches(split, indices, batch_size):
        if micro >= n_batches:
            break
        if before_step is not None:
            before_step(step_offset + micro)
        timer.lap("data")
        first = micro % accumulation_steps == 0
        last = (micro + 1) % accumulation_steps == 0 or micro + 1 == n_batches
        if first:
            sync.zero_grad()
        with contextlib.nullcontext() if last else sync.no_sync():
            logits = module(x)
            loss = F.cross_entropy(logits, y)
            (loss / accumulation_steps if accumulation_steps > 1 else loss).backward()
        with torch.no_grad():
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
        fwd_bwd = timer.lap("compute")
        in_backward = min(sync.pop_seconds(), fwd_bwd)  # DDP communicates inside backward
        timer.seconds["compute"] -= in_backward
        timer.seconds["sync"] += in_backward
        if last:
            sync.after_backward()
            timer.lap("sync")
            if lr_scale is not None:
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * lr_scale(step_offset // accumulation_steps + optimizer_steps)
            optimizer.step()
            timer.lap("optimizer")
            sync.after_step()  # local SGD averages weights here
            timer.lap("sync")
            optimizer_steps += 1
        seen += y.shape[0]
        micro += 1
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base  # the epoch-level scheduler owns the base rate
    sync.consolidate()  # local SGD: average the pending steps, so every rank ends with the same weights
    timer.lap("sync")
    seconds = time.perf_counter() - start
    totals = reduce(torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device,
                                                                           dtype=torch.float64)]))
    return {
        "train_loss": float(totals[0] / totals[2]),
        "train_accuracy": float(totals[1] / totals[2]),
        "train_samples": int(totals[2]),
        "steps": micro,
        "optimizer_steps": optimizer_steps,
        "epoch_time_s": seconds,
        "phase_s": dict(timer.seconds),
    }


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, indices: torch.Tensor, *, reduce: Reduce = no_reduce,
             batch_size: int = 2000, return_predictions: bool = False) -> dict:
    """Loss and accuracy over the given indices, summed over ranks by ``reduce``.

    With :func:`ddp_helpers.data.eval_indices` every test sample is counted exactly once.
    """
    was_training = model.training
    model.eval()
    device = split.images.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    predictions = []
    for x, y in batches(split, indices, batch_size):
        logits = model(x)
        pred = logits.argmax(1)
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[1] += (pred == y).sum()
        sums[2] += y.shape[0]
        if return_predictions:
            predictions.append(pred.cpu())
    model.train(was_training)
    local = {"loss_sum": float(sums[0]), "correct": int(sums[1]), "count": int(sums[2])}
    totals = reduce(sums.clone())
    out = {"val_loss": float(totals[0] / totals[2]), "val_accuracy": float(totals[1] / totals[2]),
           "val_samples": int(totals[2]), "local": local}
    if return_predictions:
        out["predictions"] = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
    return out
