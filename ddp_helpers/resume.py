"""A rank's training state through checkpoints: rank 0 saves it after an epoch, and on resume
rank 0 chooses the checkpoint and every rank restores from rank 0's choice."""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import CheckpointError, latest_good_checkpoint, save_checkpoint
from .dist import RankContext
from .engine import set_lr


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def save(folder: str, keep: int, config: dict, ctx: RankContext, model, optimizer, scheduler, epoch: int,
         global_step: int, history: list[dict]) -> None:
    """Rank 0 writes the checkpoint of a finished epoch, with every rank's RNG states."""
    states = ctx.gather(rng_states(ctx.device))
    if ctx.is_main:
        save_checkpoint(folder, {
            "epoch": epoch, "global_step": global_step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
            "rng": states, "config": config}, keep=keep)


def chosen_checkpoint(folder: str, config: dict, ctx: RankContext) -> tuple[dict | None, list[str]]:
    """Rank 0's choice of checkpoint (and its notes), on every rank.

    Each node may keep its own folder (node-local disks): only rank 0's holds checkpoints, and
    ranks that chose for themselves would resume from different epochs. So rank 0 chooses and
    sends the state; if its choice fails (a checkpoint of another run), every rank raises that
    error instead of waiting for a state that never comes.
    """
    if ctx.world_size == 1:
        return latest_good_checkpoint(folder, config)
    choice: list[Any] = [None]
    if ctx.is_main:
        try:
            choice = [latest_good_checkpoint(folder, config)]
        except Exception as exc:
            torch.distributed.broadcast_object_list([str(exc)], src=0)
            raise
    torch.distributed.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], str):
        raise CheckpointError(choice[0])
    return choice[0]


def restore(folder: str, config: dict, ctx: RankContext, model, optimizer, scheduler) -> tuple[int, int, list, list[str]]:
    """Load the newest good checkpoint, if any: (start epoch, global step, history, notes)."""
    state, notes = chosen_checkpoint(folder, config, ctx)
    if state is None:
        return 0, 0, [], notes + [f"no usable checkpoint in {folder}: started from scratch"]
    model.load_state_dict(state["model"])
    groups = [dict(group) for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])  # replaces whole groups: keep this run's implementation
    rates = [float(group["lr"]) for group in optimizer.param_groups]
    for group, mine in zip(optimizer.param_groups, groups):
        for key in ("fused", "foreach", "capturable", "lr"):  # lr: this run's device tensor, if any
            group[key] = mine[key]
    set_lr(optimizer, rates)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][ctx.rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], ctx.device)
    return state["epoch"], state["global_step"], state["history"], notes
