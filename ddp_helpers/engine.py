"""The training step and the evaluation pass, shared by the baseline and every DDP variant.

Nothing here knows how many processes there are: gradients are agreed on by the sync
strategy (``sync``), metric sums are added up across ranks by the caller.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Split, batches
from .errors import DDPError

PHASES = ("data", "compute", "sync", "optimizer")


class NonFiniteLossError(DDPError, FloatingPointError):
    """The training loss became NaN or infinite: the run has diverged. It stops and says where,
    rather than train on and write a record whose accuracy looks like a result. ``rank_at_fault``:
    the rank whose loss it was (every rank raises it together), so that the launcher names that one."""

    def __init__(self, message: str, rank_at_fault: int = 0):
        super().__init__(message)
        self.rank_at_fault = rank_at_fault


def make_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float, capturable: bool = False,
                   ) -> tuple[torch.optim.Optimizer, str]:
    """Adam in its fastest available form: fused (one kernel for all tensors), else foreach.
    ``capturable`` keeps its step counter and learning rate on the device (CUDA graphs)."""
    params = list(params)
    if capturable:
        lr_tensor = torch.tensor(lr, device=params[0].device)
        return torch.optim.Adam(params, lr=lr_tensor, weight_decay=weight_decay, fused=True, capturable=True), \
            "fused, capturable"
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True), "fused"
    except (RuntimeError, TypeError):  # older torch, or a device without a fused kernel
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True), "foreach"


def set_lr(optimizer: torch.optim.Optimizer, rates: list[float]) -> None:
    """Set each parameter group's learning rate (in place where it is a device tensor)."""
    for group, rate in zip(optimizer.param_groups, rates):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate


def warmup_scale(warmup_steps: int) -> Callable[[int], float] | None:
    """Linear warm-up: optimizer step n runs at (n + 1) / warmup_steps of the rate, up to 1."""
    if not warmup_steps:
        return None
    return lambda step: min(1.0, (step + 1) / warmup_steps)


class Profiler:
    """Seconds per phase of the training steps (``PHASES``), for the record's step split. Optional:
    the step runs the same without one. On the CPU, wall clock between laps. On CUDA, events
    recorded in stream order and read once at the end, so timing never stalls the GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.events: list[tuple[str, torch.cuda.Event]] = []
        self.within = 0.0  # seconds of the open lap spent communicating (reported by DDP's hook)
        self.restart()

    def restart(self) -> None:
        """Start the first lap now (at the start of a stretch of steps)."""
        self._last = time.perf_counter()
        if self.cuda:
            self.events = [("", self._record())]

    @staticmethod
    def _record() -> "torch.cuda.Event":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def communicated(self, seconds: float) -> None:
        """The open lap spent ``seconds`` communicating: DDP all-reduces inside backward, where the
        lap is "compute". Exact with one bucket; with smaller buckets part of it overlaps backward and
        counts as synchronisation too. On CUDA the host cannot see it: it stays in the lap."""
        self.within += seconds

    def lap(self, phase: str) -> None:
        """Close the current lap and count its time as ``phase``."""
        if self.cuda:
            self.events.append((phase, self._record()))
            return
        now = time.perf_counter()
        elapsed, moved = now - self._last, min(self.within, now - self._last)
        self.seconds[phase] += elapsed - moved
        self.seconds["sync"] += moved
        self._last, self.within = now, 0.0

    def take(self) -> dict[str, float]:
        """Seconds per phase so far; counting starts again from zero."""
        if self.cuda and len(self.events) > 1:
            self.events[-1][1].synchronize()
            for (_, start), (phase, end) in zip(self.events, self.events[1:]):
                self.seconds[phase] += start.elapsed_time(end) / 1000
            self.events = self.events[-1:]
        taken, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return taken


class Tally:
    """Loss and accuracy sums kept on the device, so that no step waits for the GPU."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, samples

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.sums[0] += loss.detach().double() * y.shape[0]
        self.sums[1] += (logits.argmax(1) == y).sum()
        self.sums[2] += y.shape[0]

    def take(self) -> torch.Tensor:
        """The sums so far; the tally starts again from zero."""
        out = self.sums.clone()
        self.sums.zero_()
        return out


def step(sync, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, tally: Tally,
         profiler: Profiler | None = None, *, starts_step: bool = True, ends_step: bool = True,
         accumulate: int = 1, set_to_none: bool = True, autocast: torch.dtype | None = None) -> torch.Tensor:
    """One micro-batch, the only training step there is: the plain listing's four lines (zero_grad,
    forward and loss, backward, optimizer step), and the lines marked ``+``. With accumulation, the
    last micro-batch of a step also syncs and steps; a short last group is still divided by
    ``accumulate``. ``set_to_none=False`` zeroes gradients in place (a CUDA graph holds their
    addresses; it captures this function too). ``autocast``: the forward pass's lower precision
    (bfloat16: mixed precision; the weights, gradients and Adam stay float32). Returns the loss."""
    lap = profiler.lap if profiler is not None else _no_lap              # + timing, when asked
    if starts_step:
        sync.zero_grad(set_to_none=set_to_none)
    with contextlib.nullcontext() if ends_step else sync.no_sync():      # + accumulate: sync on the last only
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):  # +
            logits = sync.module(x)
            loss = F.cross_entropy(logits, y)
        (loss / accumulate).backward()                                   # DDP all-reduces inside backward
    tally.add(loss, logits, y)                                           # + metrics, kept on the device
    lap("compute")
    if ends_step:
        sync.after_backward()                                            # + an explicit all-reduce (manual)
        lap("sync")
        optimizer.step()
        lap("optimizer")
        sync.after_step()                                                # + local SGD averages weights here
        lap("sync")
    return loss


def _no_lap(phase: str) -> None:
    pass


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, indices: torch.Tensor, batch_size: int = 2000,
             return_predictions: bool = False) -> dict:
    """This rank's loss sum, correct count and sample count over ``indices``.

    Summed over ranks (with :func:`ddp_helpers.data.eval_indices`) every test sample
    counts exactly once.
    """
    was_training = model.training
    model.eval()
    tally, predictions = Tally(split.images.device), []
    for x, y in batches(split, indices, batch_size):
        logits = model(x)
        tally.add(F.cross_entropy(logits, y), logits, y)
        if return_predictions:
            predictions.append(logits.argmax(1).cpu())
    model.train(was_training)
    out = {"sums": tally.sums}
    if return_predictions:
        out["predictions"] = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
    return out


def metrics(sums: torch.Tensor, prefix: str) -> dict:
    """Mean loss and accuracy from (loss sum, correct, count)."""
    loss_sum, correct, count = (float(v) for v in sums)
    return {f"{prefix}_loss": loss_sum / count, f"{prefix}_accuracy": correct / count, f"{prefix}_samples": int(count)}
