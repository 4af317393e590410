"""Local SGD: each rank steps on its own gradients; every k steps the ranks average weights.

k times fewer messages than one all-reduce of the gradients every step, at the price of replicas
that drift apart between averages. Adam's moment estimates stay local to each rank.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector

from .base import LocalSync, broadcast_parameters, views


class LocalSGDSync(LocalSync):
    """Every ``every`` optimizer steps, one all-reduce of the flat parameter vector averages the weights."""

    name = "local_sgd"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int, transport):
        super().__init__(model, optimizer)
        self.world_size, self.every, self.steps = dist.get_world_size(), every, 0
        self.transport, self.comm = transport, transport.describe()
        self.params = list(model.parameters())
        broadcast_parameters(self.params)

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
        flat = parameters_to_vector(self.params)  # a copy of all weights: one message instead of one per tensor
        self.transport.all_reduce_(flat)
        self._scatter(flat.div_(self.world_size), torch.Tensor.copy_)

    @torch.no_grad()
    def _scatter(self, flat: torch.Tensor, apply) -> None:
        """``apply(parameter, its slice of flat)`` for every parameter, in order. Not torch's
        ``vector_to_parameters``: that rebinds each parameter to a view of ``flat`` instead of
        writing into it, and cannot add (the overlapped average adds a correction)."""
        for p, view in views(flat, self.params):
            apply(p, view)


class OverlapLocalSGDSync(LocalSGDSync):
    """Local SGD whose averaging runs in the background (the all-reduce is asynchronous).

    Every ``every`` steps a rank sends a snapshot of its weights and keeps training. ``every`` steps
    later it collects the average of the snapshots and keeps its own progress since:

        w  <-  mean of the snapshots  +  (w - own snapshot)

    A rank waits only if that all-reduce is still unfinished, instead of for the slower rank at each
    average; the price is that each average arrives one period late. ``consolidate`` collects the
    pending average, then averages once more, blocking, so that every rank holds the same weights."""

    name = "local_sgd_overlap"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int, transport):
        super().__init__(model, optimizer, every, transport)
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
        own = parameters_to_vector(self.params)
        buffer = own.clone()
        self.pending = (self.transport.all_reduce_async(buffer), buffer, own)

    @torch.no_grad()
    def _collect(self) -> None:
        if self.pending is None:
            return
        work, buffer, own = self.pending
        self.pending = None
        work.wait()  # bounded by the process group's timeout
        correction = buffer.div_(self.world_size).sub_(own)  # mean of the snapshots - own snapshot
        self._scatter(correction, torch.Tensor.add_)
