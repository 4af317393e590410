"""Data parallelism by hand: one flat all-reduce per step, after backward (DDP without buckets)."""

import torch
import torch.distributed as dist
from torch import nn

from .base import LocalSync, broadcast_parameters, views


class AllReduceSync(LocalSync):
    """Each gradient is a view into one flat buffer, all-reduced (summed) once a step and divided by world size."""

    name = "allreduce"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, transport):
        super().__init__(model, optimizer)
        self.world_size, self.transport, self.comm = dist.get_world_size(), transport, transport.describe()
        params = [p for p in model.parameters() if p.requires_grad]
        broadcast_parameters(params)
        self.flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=params[0].dtype)
        for p, view in views(self.flat, params):  # autograd accumulates into an existing .grad in place
            p.grad = view
        self.params = params

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Always in place: a gradient set to None would no longer be a view into the flat buffer."""
        self.flat.zero_()

    def after_backward(self) -> None:
        if self.params[0].grad.data_ptr() != self.flat.data_ptr():
            raise RuntimeError("a gradient no longer aliases the flat buffer; was the optimizer's "
                               "zero_grad(set_to_none=True) called instead of this strategy's?")
        self.transport.all_reduce_(self.flat)  # the sum
        self.flat.div_(self.world_size)
