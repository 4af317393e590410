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


def transport_allreduce_hook(transport, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's ``allreduce_hook`` through another transport (shared memory): divide by the world
    size, sum over the ranks. It returns when the sum is there: with one bucket nothing is left to
    overlap with (see ``BucketedDataParallel`` for an asynchronous one)."""
    tensor = bucket.buffer()
    transport.all_reduce_(tensor, divide_by=dist.get_world_size())  # divided as it is copied in
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(tensor)
    return future


# name -> (hook, factory of the hook's state from the transport). torch's fp16 and PowerSGD hooks
# call dist.all_reduce themselves: they travel through gloo whatever the transport.
DDP_HOOKS = {
    "ddp": (default_hooks.allreduce_hook, lambda transport: None),
    "ddp_transport": (transport_allreduce_hook, lambda transport: transport),
    "fp16": (default_hooks.fp16_compress_hook, lambda transport: None),
    "powersgd": (powersgd.powerSGD_hook,
                 lambda transport: powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=4,
                                                          start_powerSGD_iter=2, use_error_feedback=True,
                                                          warm_start=True)),
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

    How many buckets the gradient makes depends on its size and ``bucket_cap_mb``: a bucket closes
    after the gradient that takes it past the cap, so at 25 MiB (this project's and torch's default)
    and at 1 MiB the MLP's 2.27 MB gradient is one bucket; the record holds the layout DDP really
    used (:meth:`bucket_sizes`). Each full bucket's all-reduce starts from a hook
    while backward goes on with earlier layers. ``hook``: the plain mean all-reduce (through the
    run's transport: gloo, or shared memory within a node), fp16 compression or PowerSGD low-rank
    compression with error feedback (both through gloo).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 hook: str = "ddp", transport=None, bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = False,
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
        row = "ddp_transport" if hook == "ddp" and getattr(transport, "name", "gloo") != "gloo" else hook
        self.comm = transport.describe() if row != hook or hook == "ddp" else f"gloo (torch's {hook} hook all-reduces " \
                                                                             f"through dist.all_reduce)"
        fn, make_state = DDP_HOOKS[row]
        if profiler is None:
            self.ddp.register_comm_hook(make_state(transport), fn)
        else:
            self.ddp.register_comm_hook(_TimedState(make_state(transport), profiler), _timed(fn))

    @property
    def module(self) -> nn.Module:
        return self.ddp

    def no_sync(self):
        return self.ddp.no_sync()

    @property
    def bucket_sizes(self) -> list[int]:
        """Bytes per bucket as DDP laid them out once it had seen a backward pass (its first layout,
        made before training, is rebuilt in the order gradients arrive); in all-reduce order."""
        data = self.ddp._get_ddp_logging_data()
        sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes") or ""
        return [int(size) for size in str(sizes).split(",") if size.strip()]
