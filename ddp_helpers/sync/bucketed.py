"""DDP built in the open: what DistributedDataParallel does inside, in one small class (the idea of
picotron's bucketed data parallel).

Backward produces gradients from the last layer to the first. The parameters are grouped into
buckets in that order, up to ``bucket_cap_mb`` each, and each bucket's gradients live in one flat
buffer (every ``p.grad`` is a view into it), so that a bucket travels as one message. A hook on
each parameter (``register_post_accumulate_grad_hook``) counts it ready; the moment a bucket is
complete its all-reduce starts, asynchronously, while backward goes on with earlier layers. Before
the optimizer step every all-reduce is waited for. Dividing by the world size first makes the sum
a mean. The transport makes the buffers: over shared memory they lie in the segment the ranks
reduce in, so the gradients are never copied in or out. That is DDP's whole trick; torch's own adds bucket rebuilding, unused-parameter detection
and a C++ reducer.

``timeline``: a list that receives ``(what, name, start, end)`` in seconds (``time.perf_counter``)
for each parameter's gradient, each bucket's all-reduce, the wait and the step, so that a chart can
show what overlaps and who waits.
"""

import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn

from .base import LocalSync, broadcast_parameters, views


class BucketedDataParallel(LocalSync):
    """Data parallelism with gradient buckets all-reduced as soon as backward completes each."""

    name = "bucketed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, transport, bucket_cap_mb: float = 25.0,
                 timeline: list | None = None):
        super().__init__(model, optimizer)
        self.transport, self.world, self.timeline = transport, dist.get_world_size(), timeline
        self.comm = transport.describe()
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        broadcast_parameters([p for _, p in named])  # every rank starts from rank 0's weights
        self.buckets: list[list[tuple[str, nn.Parameter]]] = [[]]
        for name, p in reversed(named):  # the order in which backward produces the gradients
            if sum(q.numel() * q.element_size() for _, q in self.buckets[-1]) >= bucket_cap_mb * 2**20:
                self.buckets.append([])  # as DDP does: a bucket closes once it holds bucket_cap_mb MiB
            self.buckets[-1].append((name, p))
        # the transport makes the buffers: shared memory lets autograd write the gradients straight into
        # the segment the ranks reduce in (no copy in or out); gloo gives ordinary tensors
        self.flats = transport.buffers([(sum(p.numel() for _, p in bucket), bucket[0][1].dtype)
                                        for bucket in self.buckets])
        self.bucket_of = {}
        for index, (bucket, flat) in enumerate(zip(self.buckets, self.flats)):
            names = {p: name for name, p in bucket}
            for p, view in views(flat, [p for _, p in bucket]):
                p.grad = view  # autograd accumulates into an existing gradient in place
                self.bucket_of[p] = (index, names[p])
                p.register_post_accumulate_grad_hook(self._ready)
        self.missing, self.pending, self.syncing = [len(b) for b in self.buckets], [], True

    @property
    def bucket_sizes(self) -> list[int]:
        """Bytes per bucket, in the order they are all-reduced."""
        return [flat.numel() * flat.element_size() for flat in self.flats]

    def _ready(self, p: nn.Parameter) -> None:
        index, name = self.bucket_of[p]
        self._mark("gradient", name, time.perf_counter())
        if not self.syncing:
            return
        self.missing[index] -= 1
        if self.missing[index] == 0:  # the bucket is complete: send it now, while backward goes on
            start = time.perf_counter()
            work = self.transport.all_reduce_async(self.flats[index], divide_by=self.world)  # the mean
            self.pending.append((work, index, start))

    def after_backward(self) -> None:
        """Wait for every bucket's all-reduce: the optimizer needs all the averaged gradients."""
        start = time.perf_counter()
        for work, index, started in self.pending:
            work.wait()
            self._mark("all-reduce", f"bucket {index}", started, work.finished_at or time.perf_counter())
        self._mark("wait", "", start, time.perf_counter())
        self.pending, self.missing = [], [len(b) for b in self.buckets]

    def after_step(self) -> None:
        self._mark("step", "", time.perf_counter())  # the optimizer has just stepped

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Always in place: a gradient set to None would no longer be a view into its bucket."""
        for flat in self.flats:
            flat.zero_()
        self._mark("zero_grad", "", time.perf_counter())

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-batches whose gradients only accumulate; the next synchronised backward sends the sum."""
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def _mark(self, what: str, name: str, start: float, end: float | None = None) -> None:
        if self.timeline is not None:
            self.timeline.append((what, name, start, start if end is None else end))
