"""What every gradient-synchronisation strategy offers the engine, as one process does it.

The training engine calls the same methods on every strategy:

    module             the nn.Module to run forward/backward through
    zero_grad()        clear gradients before the next step (in place when ``set_to_none`` is False:
                       a CUDA graph holds the gradients' addresses)
    no_sync()          context for micro-batches whose gradients must not be synced yet
    after_backward()   explicit gradient communication after backward (if any)
    after_step()       communication after the optimizer step (if any)
    consolidate()      make every rank's weights identical (before evaluation or a checkpoint)
    pop_seconds()      communication seconds spent inside backward since the last call

The engine times ``after_backward``, ``after_step`` and ``consolidate`` itself; only
communication it cannot see, because it runs inside ``backward`` (DDP's hooks), is
reported through ``pop_seconds`` so that the engine can move it from compute to sync.

This module is the bottom of the strategies: :mod:`ddp_helpers.sync` and
:mod:`ddp_helpers.local_sgd` both build on it, and only ``sync`` imports ``local_sgd``
(for its table of every strategy by name).
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn


def broadcast_parameters(params) -> None:
    """Start every rank from rank 0's weights (what DDP's constructor does)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p, src=0)


class LocalSync:
    """One process: gradients are already the global ones."""

    name = "local"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
        self.set_to_none = True  # False once a CUDA graph holds the gradients' addresses

    @property
    def module(self) -> nn.Module:
        return self.model

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.set_to_none)

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
