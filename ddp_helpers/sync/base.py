"""``LocalSync``: one process, nothing to agree on. Every strategy inherits its methods (the interface
in :mod:`ddp_helpers.sync`); it imports nothing of ours, so that every strategy module can build on it."""

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


def broadcast_parameters(params) -> None:
    """Start every rank from rank 0's weights (what DDP's constructor does)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p, src=0)


def views(flat: torch.Tensor, params) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter with its slice of ``flat`` (laid out in parameter order), shaped like it."""
    offset = 0
    for p in params:
        yield p, flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


class LocalSync:
    """One process: gradients are already the global ones."""

    name = "local"
    comm = "none"  # how this strategy's all-reduces travel, for the record
    bucket_sizes: list[int] = []  # bytes per gradient bucket, in all-reduce order (DDP and its kin)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    @property
    def module(self) -> nn.Module:
        return self.model

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``set_to_none=False`` zeroes in place: a CUDA graph holds the gradients' addresses."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def no_sync(self):
        return contextlib.nullcontext()

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def consolidate(self) -> None:
        """Strategies that synchronise gradients every step keep identical weights: nothing to do."""
