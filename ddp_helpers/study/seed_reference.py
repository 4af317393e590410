"""The original design's training loop ("design-style"), kept only as a benchmark reference.

It is what the seed document describes and what such code usually looks like: a
torchvision dataset with per-sample PIL -> tensor -> normalise transforms, a
``DataLoader`` with 2 loader processes per rank over a ``DistributedSampler``, torch's
default thread count in every rank, Adam's default (for-loop) implementation, and a
``loss.item()`` every step. The benchmark times its steps next to ours.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..model import MLP


def design_style_job(place, emit: Callable, data_root: str, warmup_steps: int, timed_steps: int,
                     timeout_s: float = 120) -> None:
    """Train design-style for warmup + timed steps; rank 0 reports the timed steps' seconds. Like the
    design, it joins through the launcher's variables (env://) and reads nothing else of ours."""
    from torchvision import datasets, transforms

    rank, world_size = place.rank, place.world_size
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        dataset = datasets.MNIST(data_root, train=True, download=False, transform=transform)
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=2)
        torch.manual_seed(0)
        model = DistributedDataParallel(MLP())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
        for step, (images, labels) in enumerate(loader):
            if step == warmup_steps:
                start = time.perf_counter()
            if step == warmup_steps + timed_steps:
                break
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            _ = loss.item()
        seconds = time.perf_counter() - start
        if rank == 0:
            emit("result", {"step_ms": 1000 * seconds / timed_steps, "steps_per_epoch": len(loader),
                            "threads": torch.get_num_threads()})
    finally:
        dist.destroy_process_group()
