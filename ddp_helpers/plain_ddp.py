"""DDP training in one plain function: read this first (notebook 03), then the engine.

It follows the PyTorch DDP tutorial: each process learns who it is from the variables its
launcher set (torchrun sets them, and so does ``launch`` for the workers it spawns), joins the
process group, gives itself its share of the data with DistributedSampler, wraps the model in
DistributedDataParallel and trains. Lines marked ``# DDP:`` are the ones that a single-process
training loop does not have. It imports torch, the model and the data loader, nothing else::

    torchrun --nproc-per-node 2 -m ddp_helpers.plain_ddp

It is also the truth the engine is held to: tests/test_plain_ddp.py checks that it ends with the
same weights as ``launch()`` on the same config (float64, to 1e-9). What it leaves out, it does as
the engine's defaults do: sync "ddp", one micro-batch per step, no warm-up, no early stop.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from .data import load_datasets
from .model import MLP

# the seed design's run; the test passes its own (float64, a subset, two epochs)
DESIGN = {"hidden_sizes": [512, 256, 128], "dropout": 0.2, "batch_size": 32, "epochs": 5, "lr": 1e-3,
          "weight_decay": 1e-5, "lr_step": 3, "lr_gamma": 0.5, "seed": 0, "dtype": "float32", "dataset": "mnist",
          "data_dir": "", "train_subset": 0, "timeout_s": 120}


def train(cfg: dict, weights_path: str = "") -> None:
    """One rank of a run of ``cfg["epochs"]`` epochs; rank 0 saves the final weights to ``weights_path``."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # DDP: who am I, of how many
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["LOCAL_WORLD_SIZE"])))  # DDP: share
    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg["timeout_s"]))  # DDP: join (MASTER_ADDR/PORT)
    try:
        dtype = getattr(torch, cfg["dtype"])
        train_split, _ = load_datasets(cfg["dataset"], cfg["data_dir"], cfg["train_subset"], 0, cfg["seed"])
        dataset = TensorDataset(train_split.images.to(dtype), train_split.labels)
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,  # DDP: this rank's share
                                     shuffle=True, seed=cfg["seed"])
        loader = DataLoader(dataset, batch_size=cfg["batch_size"], sampler=sampler,  # DDP: sampler, not shuffle
                            generator=torch.Generator())  # its own RNG: the global one is dropout's alone
        torch.manual_seed(cfg["seed"])  # the initial weights (DDP copies rank 0's to every rank anyway)
        model = MLP(cfg["hidden_sizes"], cfg["dropout"]).to(dtype)
        torch.manual_seed(cfg["seed"] + rank)  # DDP: each rank draws its own dropout masks
        model = DDP(model)  # DDP: copies rank 0's weights to every rank, and hooks into backward()
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg["lr_step"], gamma=cfg["lr_gamma"])
        for epoch in range(cfg["epochs"]):
            sampler.set_epoch(epoch)  # DDP: a new shuffle each epoch, the same one on every rank
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()  # DDP: also averages the gradients across ranks (each waits for all)
                optimizer.step()  # the same averaged gradient, so the same step, on every rank
            scheduler.step()
        if rank == 0 and weights_path:  # DDP: the ranks hold identical weights; one saves them
            torch.save(model.module.state_dict(), weights_path)
    finally:
        dist.destroy_process_group()  # DDP: leave


if __name__ == "__main__":
    train(DESIGN, "plain_ddp.pt")
