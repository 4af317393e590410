"""DistributedDataParallel with a communication hook: plain, fp16 or PowerSGD.

DDP all-reduces gradients from hooks inside ``backward``, where the profiler's laps cannot
separate them from compute; given a profiler, the hook tells it its wall time until completion.
"""

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError
from .base import LocalSync


class _TimedState:
    """A timed hook's state: the wrapped hook's own state, and the profiler to tell."""

    def __init__(self, inner_state, profiler) -> None:
        self.inner_state, self.profiler = inner_state, profiler


def _timed(hook):
    """Wrap a DDP communication hook so that its wall time until completion goes to the profiler."""

    def timed_hook(state: _TimedState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        start = time.perf_counter()
        fut = hook(state.inner_state, bucket)

        def finished(f: torch.futures.Future) -> torch.Tensor:
            state.profiler.communicated(time.perf_counter() - start)
            return f.value()

        return fut.then(finished)

    return timed_hook


# name -> (hook, factory of the hook's state)
DDP_HOOKS = {
    "ddp": (default_hooks.allreduce_hook, lambda: None),
    "fp16": (default_hooks.fp16_compress_hook, lambda: None),
    "powersgd": (powersgd.powerSGD_hook,
                 lambda: powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2,
                                                use_error_feedback=True, warm_start=True)),
}


def refusal(hook: str, device: torch.device) -> str | None:
    """Why ``hook`` cannot run on gradients on ``device`` in this process, or None if it can.

    torch's PowerSGD hooks (plain and batched) end with ``if torch.cuda.is_available():
    torch.cuda.synchronize(device)`` on the bucket's device, and nothing in ``PowerSGDState`` turns
    that off: with CUDA present, a CPU bucket fails there ("Expected a cuda device, but got: cpu")."""
    if hook == "powersgd" and device.type != "cuda" and torch.cuda.is_available():
        return ("PowerSGD cannot run on CPU tensors on a machine that has CUDA: torch's PowerSGD hook "
                "synchronises the gradient bucket's device with CUDA whenever CUDA is available, which "
                "fails for a CPU device. Fix: device='cuda' with backend='nccl', or run on a machine "
                "without CUDA, or use sync='fp16'")
    return None


class DDPSync(LocalSync):
    """DistributedDataParallel: bucketed all-reduce launched from backward hooks.

    At the config's 25 MB bucket size (passed explicitly: PyTorch's own default would cap the first
    bucket at 1 MiB) this model's whole 2.27 MB gradient is one bucket whose
    all-reduce starts when backward has produced the last gradient: nothing overlaps, and the hook's
    wall time is the exposed communication. Smaller buckets (``bucket_cap_mb``) let the last layers'
    all-reduce run while backward goes on. ``hook``: the plain mean all-reduce, fp16 compression,
    or PowerSGD low-rank compression (with error feedback).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 hook: str = "ddp", bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = False,
                 static_graph: bool = False, profiler=None):
        reason = refusal(hook, next(model.parameters()).device)  # the buckets live with the parameters
        if reason:
            raise ConfigError(reason)
        super().__init__(model, optimizer)
        self.name = hook
        device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_cap_mb,
                                           gradient_as_bucket_view=gradient_as_bucket_view,
                                           static_graph=static_graph)
        fn, make_state = DDP_HOOKS[hook]
        if profiler is None:
            self.ddp.register_comm_hook(make_state(), fn)
        else:
            self.ddp.register_comm_hook(_TimedState(make_state(), profiler), _timed(fn))

    @property
    def module(self) -> nn.Module:
        return self.ddp

    def no_sync(self):
        return self.ddp.no_sync()
