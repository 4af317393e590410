"""Gradient-synchronisation strategies: how the ranks agree on one update per step.

A strategy wraps one rank's model and optimizer and offers the engine the same methods:

    module                  the nn.Module to run forward/backward through
    zero_grad(set_to_none)  clear gradients before the next step (in place when False)
    no_sync()               context for micro-batches whose gradients must not be synced yet
    after_backward()        explicit gradient communication after backward (if any)
    after_step()            communication after the optimizer step (if any)
    consolidate()           make every rank's weights identical (before evaluation or a checkpoint)

Timing is not part of it: the engine's optional profiler times the calls, and a strategy that
communicates inside ``backward`` (DDP's hooks), where the profiler's laps cannot see it, is given
the profiler when it is built and reports that time to it.

Each strategy module builds on :mod:`.base` (and the error types) alone; only this one imports them all, for ``STRATEGIES``.
A new strategy is a class, a row there, and its name in ``config.SYNC_STRATEGIES`` (a test holds the two together).
"""

import torch
from torch import nn

from ..errors import ConfigError
from .base import LocalSync
from .bucketed import BucketedDataParallel
from .ddp import DDPSync
from .local_sgd import LocalSGDSync, OverlapLocalSGDSync
from .manual import AllReduceSync

__all__ = ["STRATEGIES", "make_sync", "LocalSync", "DDPSync", "AllReduceSync", "BucketedDataParallel",
           "LocalSGDSync", "OverlapLocalSGDSync"]

# every strategy by name, in config.SYNC_STRATEGIES's order:
# (model, optimizer, device, local_sgd_every, transport, options) -> the strategy on this rank
STRATEGIES = {
    "ddp": lambda model, opt, device, every, transport, o: DDPSync(model, opt, device, "ddp", transport, **o),
    "allreduce": lambda model, opt, device, every, transport, o: AllReduceSync(model, opt, transport),
    "fp16": lambda model, opt, device, every, transport, o: DDPSync(model, opt, device, "fp16", transport, **o),
    "powersgd": lambda model, opt, device, every, transport, o: DDPSync(model, opt, device, "powersgd", transport, **o),
    "local_sgd": lambda model, opt, device, every, transport, o: LocalSGDSync(model, opt, every, transport),
    "local_sgd_overlap": lambda model, opt, device, every, transport, o: OverlapLocalSGDSync(model, opt, every,
                                                                                             transport),
    "bucketed": lambda model, opt, device, every, transport, o: BucketedDataParallel(
        model, opt, transport, o["bucket_cap_mb"]),
}


def make_sync(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int,
              device: torch.device, local_sgd_every: int = 8, profiler=None, transport=None, **ddp_options):
    """The strategy object for a run; a single process always gets LocalSync.
    ``transport``: how all-reduces travel (:mod:`ddp_helpers.transport`: ``RankContext.transport``).
    ``ddp_options``: bucket_cap_mb, gradient_as_bucket_view, static_graph. ``profiler``: an
    :class:`ddp_helpers.engine.Profiler` that DDP's hooks tell their time to (None: untimed)."""
    if world_size == 1:
        return LocalSync(model, optimizer)
    if name not in STRATEGIES:
        raise ConfigError(f"unknown sync strategy {name!r}. Fix: use one of {list(STRATEGIES)}")
    options = {"bucket_cap_mb": 25.0, **ddp_options, "profiler": profiler}
    return STRATEGIES[name](model, optimizer, device, local_sgd_every, transport, options)
