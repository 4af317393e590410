"""DDP training in one plain function: read this first (notebook 03), then the engine.

It follows the PyTorch DDP tutorial: join the process group, give each rank its share of
the data with DistributedSampler, wrap the model in DistributedDataParallel, train. Lines
marked ``# DDP:`` are the ones that a single-process training loop does not have.

It is also the truth the engine is held to: tests/test_plain_ddp.py checks that it ends
with the same weights as ``launch()`` on the same config (float64, to 1e-9). What it
leaves out, it does as the engine's defaults do: sync "ddp", one micro-batch per step, no
warm-up, no early stop. It runs on the CPU (gloo), through the engine's spawn path:

    results = run_workers(plain_ddp.train_rank, 2, (cfg.to_dict(),))
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from .config import TrainConfig
from .data import load_datasets
from .model import MLP
from .results import cpu_state, state_bytes


def train_rank(rank: int, world_size: int, init_method: str, emit, cfg_dict: dict) -> None:
    """One rank of a run (``cfg.epochs`` epochs); rank 0 sends back the final weights."""
    cfg = TrainConfig.from_dict(cfg_dict)
    dtype = getattr(torch, cfg.dtype)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))  # DDP: the ranks share the cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,  # DDP: join
                            timeout=timedelta(seconds=cfg.timeout_s))
    try:
        train, _ = load_datasets(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, cfg.seed)
        dataset = TensorDataset(train.images.to(dtype), train.labels)
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,  # DDP: this rank's share
                                     shuffle=True, seed=cfg.seed)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,  # DDP: sampler, not shuffle
                            generator=torch.Generator())  # its own RNG: the global one is dropout's alone
        torch.manual_seed(cfg.seed)  # the initial weights (DDP copies rank 0's to every rank anyway)
        model = MLP(cfg.hidden_sizes, cfg.dropout).to(dtype)
        torch.manual_seed(cfg.seed + rank)  # DDP: each rank draws its own dropout masks
        model = DDP(model)  # DDP: copies rank 0's weights to every rank, and hooks into backward()
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        for epoch in range(cfg.epochs):
            sampler.set_epoch(epoch)  # DDP: a new shuffle each epoch, the same one on every rank
            for step, (x, y) in enumerate(loader):
                if cfg.max_steps_per_epoch and step == cfg.max_steps_per_epoch:
                    break  # a shortened epoch (tests, demos)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()  # DDP: also averages the gradients across ranks (each waits for all)
                optimizer.step()  # the same averaged gradient, so the same step, on every rank
            scheduler.step()
        if rank == 0:  # DDP: the ranks hold identical weights; one sends them back
            emit("result", {"state": state_bytes(cpu_state(model.module))})
    finally:
        dist.destroy_process_group()  # DDP: leave
