"""Gradient-synchronisation strategies: how the ranks agree on one update per step.

Every strategy offers the engine the same methods (see :mod:`ddp_helpers.sync_base`,
whose ``LocalSync`` is the single process: nothing to agree on). ``DDPSync`` is PyTorch
DistributedDataParallel with a timing communication hook. ``AllReduceSync`` does by
hand what DDP does under the hood: one flat gradient buffer, one all-reduce, divide
by the world size. ``fp16`` and ``powersgd`` are DDP with a compression hook;
the local SGD strategies (weights averaged every k steps instead of gradients every
step) are in :mod:`ddp_helpers.local_sgd`.

``STRATEGIES`` at the end is the one table of every strategy by name: a new strategy is
a class (here, or in a module that builds on ``sync_base``) and a row there, and its
name in ``config.SYNC_STRATEGIES`` (a test holds the two together).
"""


import time
import types

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

from .local_sgd import LocalSGDSync, OverlapLocalSGDSync
from .sync_base import LocalSync, broadcast_parameters


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


class _TorchSeenByCpuBuckets:
    """``torch`` as PowerSGD's hook should see it for CPU buckets: without CUDA.

    The hook ends with ``if torch.cuda.is_available(): torch.cuda.synchronize(device)``,
    with the bucket's device; for a CPU bucket on a machine that has a GPU, that raises
    "Expected a cuda device, but got: cpu". CPU work needs no synchronising."""

    cuda = types.SimpleNamespace(is_available=lambda: False)

    def __getattr__(self, name: str):
        return getattr(torch, name)


# PowerSGD's hook with the view of torch above in its globals (its inner callbacks inherit them)
_cpu_powersgd_hook = types.FunctionType(powersgd.powerSGD_hook.__code__,
                                        {**vars(powersgd), "torch": _TorchSeenByCpuBuckets()},
                                        "powerSGD_hook_for_cpu_buckets")


def _powersgd_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    hook = _cpu_powersgd_hook if bucket.buffer().device.type == "cpu" else powersgd.powerSGD_hook
    return hook(state, bucket)


# name -> (hook, factory of the hook's state)
DDP_HOOKS = {
    "ddp": (default_hooks.allreduce_hook, lambda: None),
    "fp16": (default_hooks.fp16_compress_hook, lambda: None),
    "powersgd": (_powersgd_hook,
                 lambda: powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=4,
                                                start_powerSGD_iter=2, use_error_feedback=True,
                                                warm_start=True)),
}


class DDPSync(LocalSync):
    """DistributedDataParallel: bucketed all-reduce launched from backward hooks.

    At the default 25 MB bucket size this model's whole 2.27 MB gradient is one bucket
    whose all-reduce starts when backward has produced the last gradient: nothing
    overlaps, and the hook's wall time is the exposed communication. Smaller buckets
    (``bucket_cap_mb``) let the first layers' all-reduce run while backward goes on.
    ``hook`` picks what a bucket's communication is: the plain mean all-reduce, fp16
    compression, or PowerSGD low-rank compression (with error feedback).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 hook: str = "ddp", bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = False,
                 static_graph: bool = False):
        super().__init__(model, optimizer)
        self.name = hook
        device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_cap_mb,
                                           gradient_as_bucket_view=gradient_as_bucket_view,
                                           static_graph=static_graph)
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
        broadcast_parameters(params)
        self.flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=params[0].dtype)
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


# every strategy by name, in config.SYNC_STRATEGIES's order:
# (model, optimizer, device, local_sgd_every, DDP options) -> the strategy on this rank
STRATEGIES = {
    "ddp": lambda model, opt, device, every, ddp: DDPSync(model, opt, device, hook="ddp", **ddp),
    "allreduce": lambda model, opt, device, every, ddp: AllReduceSync(model, opt),
    "fp16": lambda model, opt, device, every, ddp: DDPSync(model, opt, device, hook="fp16", **ddp),
    "powersgd": lambda model, opt, device, every, ddp: DDPSync(model, opt, device, hook="powersgd", **ddp),
    "local_sgd": lambda model, opt, device, every, ddp: LocalSGDSync(model, opt, every),
    "local_sgd_overlap": lambda model, opt, device, every, ddp: OverlapLocalSGDSync(model, opt, every),
}


def make_sync(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int,
              device: torch.device, local_sgd_every: int = 8, **ddp_options):
    """The strategy object for a run; a single process always gets LocalSync.
    ``ddp_options``: bucket_cap_mb, gradient_as_bucket_view, static_graph."""
    if world_size == 1:
        return LocalSync(model, optimizer)
    if name not in STRATEGIES:
        raise ValueError(f"unknown sync strategy {name!r}. Fix: use one of {list(STRATEGIES)}")
    return STRATEGIES[name](model, optimizer, device, local_sgd_every, ddp_options)
