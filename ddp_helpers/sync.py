"""Gradient-synchronisation strategies: how the ranks agree on one update per step.

The training engine calls the same methods on every strategy, so a new strategy
is a new class here and nothing else changes:

    module             the nn.Module to run forward/backward through
    zero_grad()        clear gradients before the next step
    no_sync()          context for micro-batches whose gradients must not be synced yet
    after_backward()   explicit gradient communication after backward (if any)
    after_step()       communication after the optimizer step (if any)
    consolidate()      make every rank's weights identical (before evaluation or a checkpoint)
    pop_seconds()      communication seconds spent inside backward since the last call

The engine times ``after_backward``, ``after_step`` and ``consolidate`` itself; only
communication it cannot see, because it runs inside ``backward`` (DDP's hooks), is
reported through ``pop_seconds`` so that the engine can move it from compute to sync.

``LocalSync`` is the single process (nothing to agree on). ``DDPSync`` is PyTorch
DistributedDataParallel with a timing communication hook. ``AllReduceSync`` does by
hand what DDP does under the hood: one flat gradient buffer, one all-reduce, divide
by the world size. ``fp16`` and ``powersgd`` are DDP with a compression hook;
``LocalSGDSync`` trains each rank on its own and averages the weights every k steps;
``OverlapLocalSGDSync`` does the same with the averaging running behind the training.
"""


import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
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

    def no_sync(self):
        return contextlib.nullcontext()

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def consolidate(self) -> None:
        """Strategies that synchronise gradients every step keep identical weights: nothing to do."""

    def pop_seconds(self) -> float:
        return 0.0  # nothing communicates inside backward


class _HookState:
    """What a timed DDP hook writes into: the wrapped hook's own state, and seconds so far."""

    def __init__(self, inner_state=None) -> None:
        self.inner_state = inner_state
        self.seconds = 0.0


def _timed(hook):
    """Wrap a DDP communication hook so that its wall time until completion is recorded."""

    def timed_hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        start = time.perf_counter()
        fut = hook(state.inner_state, bucket)

        def finished(f: torch.futures.Future) -> torch.Tensor:
            state.seconds += time.perf_counter() - start
            return f.value()

        return fut.then(finished)

    return timed_hook


# name -> (hook, factory of the hook's state)
DDP_HOOKS = {
    "ddp": (default_hooks.allreduce_hook, lambda: None),
    "fp16": (default_hooks.fp16_compress_hook, lambda: None),
    "powersgd": (powersgd.powerSGD_hook,
                 lambda: powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=4,
                                                start_powerSGD_iter=2, use_error_feedback=True,
                                                warm_start=True)),
}


class DDPSync(LocalSync):
    """DistributedDataParallel: bucketed all-reduce launched from backward hooks.

    The default bucket is 25 MB and this model's gradient is 2.27 MB, so all of it
    lands in one bucket whose all-reduce starts when backward has produced the last
    gradient: nothing overlaps, and the hook's wall time is the exposed communication.
    ``hook`` picks what the bucket's communication is: the plain mean all-reduce,
    fp16 compression, or PowerSGD low-rank compression (with error feedback).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 hook: str = "ddp"):
        super().__init__(model, optimizer)
        self.name = hook
        device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        fn, make_state = DDP_HOOKS[hook]
        self.state = _HookState(make_state())
        self.ddp.register_comm_hook(self.state, _timed(fn))

    @property
    def module(self) -> nn.Module:
        return self.ddp

    def no_sync(self):
        return self.ddp.no_sync()

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

    def zero_grad(self) -> None:
        self.flat.zero_()  # keep the views: set_to_none would detach .grad from the buffer

    def after_backward(self) -> None:
        if self.params[0].grad.data_ptr() != self.flat.data_ptr():
            raise RuntimeError("a gradient no longer aliases the flat buffer; was zero_grad(set_to_none) called?")
        dist.all_reduce(self.flat, op=dist.ReduceOp.SUM)
        self.flat.div_(self.world_size)


class LocalSGDSync(LocalSync):
    """Local SGD: every rank steps on its own gradients; every ``every`` optimizer steps
    the ranks average their weights (one all-reduce of the flat parameter vector).
    Adam's moment estimates stay local to each rank."""

    name = "local_sgd"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int):
        super().__init__(model, optimizer)
        self.world_size, self.every, self.steps = dist.get_world_size(), every, 0
        self.params = [p for p in model.parameters()]
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p, src=0)

    def after_step(self) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self._average()

    def consolidate(self) -> None:
        """Average the steps taken since the last average, so that evaluation sees one model."""
        if self.steps % self.every:
            self._average()
            self.steps = 0

    @torch.no_grad()
    def _average(self) -> None:
        flat = self._flat()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self._scatter(flat.div_(self.world_size), torch.Tensor.copy_)

    def _flat(self) -> torch.Tensor:
        """A copy of all weights as one vector (one message instead of one per tensor)."""
        return torch.cat([p.reshape(-1) for p in self.params])

    @torch.no_grad()
    def _scatter(self, flat: torch.Tensor, apply) -> None:
        """``apply(parameter, its slice of flat)`` for every parameter, in order."""
        offset = 0
        for p in self.params:
            apply(p, flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


class OverlapLocalSGDSync(LocalSGDSync):
    """Local SGD whose averaging runs in the background (the all-reduce is asynchronous).

    Every ``every`` steps a rank sends a snapshot of its weights and keeps training. At the
    next averaging point, ``every`` steps later, it collects the average of the snapshots
    and keeps its own progress since it sent its snapshot:

        w  <-  mean of the snapshots  +  (w - own snapshot)

    A rank therefore waits only if the all-reduce is still unfinished ``every`` steps
    later, instead of waiting for the slower rank at each average; the price is that
    each average arrives one period late. ``consolidate`` collects the pending average,
    then averages once more, blocking, so that every rank holds the same weights."""

    name = "local_sgd_overlap"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int):
        super().__init__(model, optimizer, every)
        self.pending = None  # (all-reduce in flight, its buffer, this rank's snapshot)

    def after_step(self) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self._collect()
            self._send()

    def consolidate(self) -> None:
        self._collect()
        self._average()
        self.steps = 0

    @torch.no_grad()
    def _send(self) -> None:
        own = self._flat()
        buffer = own.clone()
        self.pending = (dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True), buffer, own)

    @torch.no_grad()
    def _collect(self) -> None:
        if self.pending is None:
            return
        work, buffer, own = self.pending
        self.pending = None
        work.wait()  # bounded by the process group's timeout
        correction = buffer.div_(self.world_size).sub_(own)  # mean of the snapshots - own snapshot
        self._scatter(correction, torch.Tensor.add_)


def make_sync(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int,
              device: torch.device, local_sgd_every: int = 8):
    """The strategy object for a run; a single process always gets LocalSync."""
    if world_size == 1:
        return LocalSync(model, optimizer)
    if name in DDP_HOOKS:
        return DDPSync(model, optimizer, device, hook=name)
    if name == "allreduce":
        return AllReduceSync(model, optimizer)
    if name == "local_sgd":
        return LocalSGDSync(model, optimizer, local_sgd_every)
    if name == "local_sgd_overlap":
        return OverlapLocalSGDSync(model, optimizer, local_sgd_every)
    raise ValueError(f"unknown sync strategy {name!r}")
