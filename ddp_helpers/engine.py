"""The training step and the evaluation pass, shared by the baseline and every DDP variant.

Nothing here knows how many processes there are: gradients are agreed on by the sync
strategy (``sync``), metric sums are added up across ranks by the caller.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data import Split, batches

PHASES = ("data", "compute", "sync", "optimizer")


class NonFiniteLossError(FloatingPointError):
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


class PhaseTimer:
    """Seconds per phase of the steps. On the CPU, wall clock between laps. On CUDA, events
    recorded in stream order and read once at the end, so timing never stalls the GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.events: list[tuple[str, torch.cuda.Event]] = []
        self._last = time.perf_counter()
        if self.cuda:
            self.events.append(("", self._record()))

    @staticmethod
    def _record() -> "torch.cuda.Event":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, phase: str) -> None:
        """Close the current phase and count its time."""
        if self.cuda:
            self.events.append((phase, self._record()))
            return
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def move(self, seconds: float, source: str, target: str) -> None:
        """Count ``seconds`` of ``source`` as ``target``: DDP communicates inside backward. Exact with
        one bucket (the default here); with smaller buckets part of it overlaps backward and this
        counts the overlapped part as synchronisation. On CUDA the host cannot see it: it stays put."""
        if not self.cuda:
            seconds = min(seconds, self.seconds[source])
            self.seconds[source] -= seconds
            self.seconds[target] += seconds

    def totals(self) -> dict[str, float]:
        if self.cuda and len(self.events) > 1:
            self.events[-1][1].synchronize()
            for (_, start), (phase, end) in zip(self.events, self.events[1:]):
                self.seconds[phase] += start.elapsed_time(end) / 1000
            self.events = self.events[-1:]
        return dict(self.seconds)


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


def with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """Each item with a flag that says whether it is the last one."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


class NoTimer:
    """A timer that counts nothing: a step captured in a CUDA graph is timed as one replay."""

    def lap(self, phase: str) -> None:
        pass

    def move(self, seconds: float, source: str, target: str) -> None:
        pass


def step(sync, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, tally: Tally,
         timer: PhaseTimer | NoTimer = NoTimer(), *, starts_step: bool = True, ends_step: bool = True,
         accumulate: int = 1, set_to_none: bool = True) -> torch.Tensor:
    """One micro-batch, the only training step there is (the CUDA graph captures this function too):
    forward and backward; on the last micro-batch of a step, also sync and Adam. A short last group
    of micro-batches is still divided by ``accumulate``. ``set_to_none=False`` zeroes gradients in
    place (a CUDA graph holds their addresses). Returns the loss."""
    if starts_step:
        sync.zero_grad(set_to_none=set_to_none)
    with contextlib.nullcontext() if ends_step else sync.no_sync():
        logits = sync.module(x)
        loss = F.cross_entropy(logits, y)
        (loss / accumulate).backward()              # DDP all-reduces inside backward...
    tally.add(loss, logits, y)
    timer.lap("compute")
    timer.move(sync.pop_seconds(), "compute", "sync")  # ...and that part of it is synchronisation
    if ends_step:
        sync.after_backward()                       # an explicit all-reduce (the manual strategy)
        timer.lap("sync")
        optimizer.step()
        timer.lap("optimizer")
        sync.after_step()                           # local SGD averages the weights here
        timer.lap("sync")
    return loss


def train_steps(sync, optimizer: torch.optim.Optimizer, steps: Iterable[tuple[torch.Tensor, torch.Tensor]],
                tally: Tally, *, accumulate: int = 1, lr_scale: Callable[[int], float] | None = None,
                first_step: int = 0, before_step: Callable[[int], None] | None = None, graph=None,
                check_loss: Callable[[torch.Tensor, int], None] | None = None) -> dict:
    """Train on the given mini-batches; return how many steps were taken and the time per phase.

    Every ``accumulate`` micro-batches make one optimizer step, synchronised on the last of
    them only. ``first_step`` is the run's count of micro-batches so far; ``lr_scale(n)``
    scales the rate of optimizer step n (warm-up); ``before_step(step)`` runs first (progress,
    fault injection). ``graph`` (a :class:`ddp_helpers.cuda_graph.GraphedStep`) replays the
    captured :func:`step` for each full batch. ``check_loss(loss, step)`` sees the loss of each step
    run eagerly (a captured step's loss stays on the GPU, in the tally).
    """
    sync.module.train()
    timer = PhaseTimer(tally.sums.device)
    base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
    done = optimizer_steps = 0
    first_optimizer_step = first_step // accumulate
    for (x, y), last_batch in with_last(steps):
        if before_step is not None:
            before_step(first_step + done)
        timer.lap("data")
        starts_step, ends_step = done % accumulate == 0, (done + 1) % accumulate == 0 or last_batch
        if ends_step and lr_scale is not None:
            set_lr(optimizer, [lr * lr_scale(first_optimizer_step + optimizer_steps) for lr in base_lrs])
        if graph is not None and graph.fits(x):
            graph.step(x, y)                        # zero_grad, forward, backward, Adam: one replay
            timer.lap("compute")
        else:
            loss = step(sync, optimizer, x, y, tally, timer, starts_step=starts_step, ends_step=ends_step,
                        accumulate=accumulate, set_to_none=graph is None)
            if check_loss is not None:
                check_loss(loss, first_step + done)
        optimizer_steps += ends_step
        done += 1
    set_lr(optimizer, base_lrs)  # the epoch-level scheduler owns the base rate
    sync.consolidate()  # local SGD: average the pending steps, so that every rank evaluates one model
    timer.lap("sync")
    return {"steps": done, "optimizer_steps": optimizer_steps, "phase_s": timer.totals()}


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
