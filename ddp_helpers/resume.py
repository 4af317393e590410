"""A rank's training state through checkpoints: rank 0 saves it after an epoch, and on resume
rank 0 chooses the checkpoint and every rank restores from rank 0's choice."""

from __future__ import annotations

from dataclasses import dataclass, field
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
         global_step: int, history: list[dict], progress: dict | None = None) -> None:
    """Rank 0 writes the checkpoint of ``epoch`` finished epochs, with every rank's RNG states; with
    ``progress``, of a stop within the next epoch (how far it came, and its sums so far)."""
    states = ctx.gather(rng_states(ctx.device))
    if ctx.is_main:
        state = {"epoch": epoch, "global_step": global_step, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                 "rng": states, "config": config}
        save_checkpoint(folder, {**state, "progress": progress} if progress else state, keep=keep)


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


def resized(saved: dict, config: dict, world_size: int) -> tuple[int, list[str]]:
    """The accumulation to resume with at ``world_size`` from a checkpoint made at ``saved``'s, and a
    note when the size changed: the global batch is kept where the checkpoint's is a whole number of
    this run's micro-batches, else it changes (said)."""
    accumulate = config["accumulation_steps"]
    if (saved["world_size"], saved["accumulation_steps"]) == (world_size, accumulate):
        return accumulate, []
    kept = saved["batch_size"] * saved["world_size"] * saved["accumulation_steps"]
    per_step = config["batch_size"] * world_size
    change = f"resumed at world size {world_size} from a checkpoint made at world size {saved['world_size']}"
    dropout = ("; with dropout the masks now come from other random streams: a valid continuation, not the same "
               "numbers" if config["dropout"] else "")
    if kept % per_step == 0:
        return kept // per_step, [f"{change}: the global batch stays {kept} ({kept // per_step} micro-batch(es) of "
                                  f"{config['batch_size']} per rank and step){dropout}"]
    return accumulate, [f"{change}: the global batch changes from {kept} to {per_step * accumulate} ({kept} is not a "
                        f"multiple of {per_step}){dropout}"]


@dataclass
class Restored:
    """Where a resumed run starts: finished epochs, micro-batches per rank so far, the history, notes,
    the accumulation to train with (a resize may change it), and how far into the next epoch a stop
    came (None after a whole epoch)."""

    epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    accumulate: int = 1
    progress: dict | None = None


def restore(folder: str, config: dict, ctx: RankContext, model, optimizer, scheduler) -> Restored:
    """Load the newest good checkpoint, if any, into the model, optimizer and scheduler."""
    state, notes = chosen_checkpoint(folder, config, ctx)
    if state is None:
        return Restored(notes=notes + [f"no usable checkpoint in {folder}: started from scratch"],
                        accumulate=config["accumulation_steps"])
    accumulate, resize = resized(state["config"], config, ctx.world_size)
    if resize and state.get("progress"):
        raise CheckpointError(f"the newest checkpoint in {folder} stopped within an epoch at world size "
                              f"{state['config']['world_size']}; within an epoch the ranks' shares of the data "
                              f"depend on it. Fix: resume at world size {state['config']['world_size']}, or remove "
                              f"that file to resume from the epoch before at any size")
    model.load_state_dict(state["model"])
    groups = [dict(group) for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])  # replaces whole groups: keep this run's implementation
    rates = [float(group["lr"]) for group in optimizer.param_groups]
    for group, mine in zip(optimizer.param_groups, groups):
        for key in ("fused", "foreach", "capturable", "lr"):  # lr: this run's device tensor, if any
            group[key] = mine[key]
    set_lr(optimizer, rates)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][ctx.rank % len(state["rng"])]  # at another world size, some rank's states: still random
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], ctx.device)
    step = state["global_step"]  # micro-batches per rank so far; at another size, as many as its steps make
    if resize:
        step = sum(row["optimizer_steps"] for row in state["history"]) * accumulate  # the warm-up counts steps
    return Restored(state["epoch"], step, state["history"], notes + resize, accumulate, state.get("progress"))
