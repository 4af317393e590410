"""Gradient-synchronisation strategies: how the ranks agree on one update per step.

The training engine calls the same four methods on every strategy, so a new
strategy is a new class here and nothing else changes:

    module             the nn.Module to run forward/backward through
    zero_grad()        clear gradients before the next step
    after_backward()   explicit communication after backward (if any)
    pop_seconds()      communication seconds spent since the last call

``LocalSync`` is the single process (nothing to agree on). ``DDPSync`` is PyTorch
DistributedDataParallel with a timing communication hook. ``AllReduceSync`` does by
hand what DDP does under the hood: one flat gradient buffer, one all-reduce, divide
by the world size.
"""


import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel


class LocalSync:
    """One process: gradients are already the global ones."""

    name = "local"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    @property
    def module(self) -> nn.Module:
        return self.model

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def after_backward(self) -> None:
        pass

    def pop_seconds(self) -> float:
        return 0.0


class _HookState:
    """What the DDP timing hook writes into: communication seconds so far."""

    def __init__(self) -> None:
        self.seconds = 0.0


def _timed_allreduce_hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce (mean over ranks), plus the wall time until it completes."""
    start = time.perf_counter()
    fut = default_hooks.allreduce_hook(None, bucket)

    def finished(f: torch.futures.Future) -> torch.Tensor:
        state.seconds += time.perf_counter() - start
        return f.value()

    return fut.then(finished)


class DDPSync(LocalSync):
    """DistributedDataParallel: bucketed all-reduce launched from backward hooks.

    The default bucket is 25 MB and this model's gradient is 2.27 MB, so all of it
    lands in one bucket whose all-reduce starts when backward has produced the last
    gradient: nothing overlaps, and the hook's wall time is the exposed communication.
    """

    name = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        super().__init__(model, optimizer)
        device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        self.state = _HookState()
        self.ddp.register_comm_hook(self.state, _timed_allreduce_hook)

    @property
    def module(self) -> nn.Module:
        return self.ddp

    def pop_seconds(self) -> float:
        seconds, self.state.seconds = self.state.seconds, 0.0
        return seconds


class AllReduceSync(LocalSync):
    """Manual data parallelism: every gradient is a view into one flat buffer that is
    all-reduced (summed) once per step and divided by the world size."""

    name = "allreduce"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(model, optimizer)
        self.world_size = dist.get_world_size()
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():  # start from identical weights, as DDP's constructor does
            for p in params:
                dist.broadcast(p, src=0)
        self.flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
        offset = 0
        for p in params:  # autograd accumulates into an existing .grad in place
            p.grad = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.params = params
        self.seconds = 0.0

    def zero_grad(self) -> None:
        self.flat.zero_()  # keep the views: set_to_none would detach .grad from the buffer

    def after_backward(self) -> None:
        if self.params[0].grad.data_ptr() != self.flat.data_ptr():
            raise RuntimeError("a gradient no longer aliases the flat buffer; was zero_grad(set_to_none) called?")
        start = time.perf_counter()
        dist.all_reduce(self.flat, op=dist.ReduceOp.SUM)
        self.flat.div_(self.world_size)
        self.seconds += time.perf_counter() - start

    def pop_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def make_sync(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int,
              device: torch.device):
    """The strategy object for a run; a single process always gets LocalSync."""
    if world_size == 1:
        return LocalSync(model, optimizer)
    if name == "ddp":
        return DDPSync(model, optimizer, device)
    if name == "allreduce":
        return AllReduceSync(model, optimizer)
    raise ValueError(f"unknown sync strategy {name!r}")
