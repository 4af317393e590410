"""The epoch loop: one function that every run goes through, on one rank or many.

``fit`` builds the model, optimizer, scheduler and sync strategy (restoring them from
a checkpoint on resume), then alternates ``train_one_epoch`` and ``evaluate``, writes
a checkpoint after each epoch when asked to, and returns the history.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .checkpoint import latest_good_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Split, eval_indices, load_datasets, train_indices
from .dist import RankContext
from .engine import PHASES, evaluate, make_optimizer, train_one_epoch
from .model import MLP, count_parameters
from .sync import make_sync


@dataclass
class FitOutput:
    """What a rank hands back after training."""

    history: list[dict[str, Any]]
    runtime: dict[str, Any]
    model: torch.nn.Module


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in the baseline
    return MLP(cfg.hidden_sizes, cfg.dropout).to(device)


def fault_injector(cfg: TrainConfig, rank: int,
                   notify: Callable[[str, Any], None] | None = None) -> Callable[[int], None] | None:
    """A before-step hook that makes one rank fail on purpose (tests and demos).

    Under torchrun it fires on the first attempt only, so an elastic restart can finish.
    """
    if cfg.fail_rank != rank or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None

    def maybe_fail(step: int) -> None:
        if step == cfg.fail_step:
            if notify is not None:  # lets the launcher measure how long detection takes
                notify("fault", {"rank": rank, "step": step, "kind": cfg.fail_kind, "time": time.time()})
            if cfg.fail_kind == "exit":
                os._exit(17)
            if cfg.fail_kind == "hang":
                time.sleep(10 * cfg.timeout_s + 3600)
            raise RuntimeError(f"injected fault: rank {rank} failed at step {step}")

    return maybe_fail


def _progress_bar(cfg: TrainConfig, epoch: int, samples: int):
    from tqdm.auto import tqdm

    return tqdm(total=_steps_in_epoch(cfg, samples), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=0.5)


def _chain(fault: Callable[[int], None] | None, bar) -> Callable[[int], None] | None:
    """One before-step hook from the optional fault injector and progress bar."""
    if bar is None:
        return fault

    def hook(step: int) -> None:
        if fault is not None:
            fault(step)
        bar.update(1)

    return hook


def _steps_in_epoch(cfg: TrainConfig, samples: int) -> int:
    steps = -(-samples // cfg.batch_size)
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def eval_points(steps: int, evals: int, accumulation_steps: int = 1) -> list[int]:
    """The micro-steps after which to evaluate: ``evals`` roughly equal parts of the
    epoch, each ending on an optimizer step; the last point is the epoch's end."""
    points = [(steps * j // evals) // accumulation_steps * accumulation_steps for j in range(1, evals)]
    return sorted({p for p in points if 0 < p < steps} | {steps})


def merge_parts(parts: list[dict]) -> dict:
    """One epoch's training summary from the summaries of its parts (between evaluations)."""
    samples = sum(p["train_samples"] for p in parts)
    return {
        "train_loss": sum(p["train_loss"] * p["train_samples"] for p in parts) / samples,
        "train_accuracy": sum(p["train_accuracy"] * p["train_samples"] for p in parts) / samples,
        "train_samples": samples,
        "steps": sum(p["steps"] for p in parts),
        "optimizer_steps": sum(p["optimizer_steps"] for p in parts),
        "epoch_time_s": sum(p["epoch_time_s"] for p in parts),
        "phase_s": {k: sum(p["phase_s"][k] for p in parts) for k in parts[0]["phase_s"]},
    }


def epoch_row(epoch: int, lr: float, train: dict, val: dict, eval_s: float) -> dict:
    """One row of the history: metrics, times and the per-step time split in ms."""
    steps = max(train["steps"], 1)
    step_ms = {p: 1000 * train["phase_s"][p] / steps for p in PHASES}
    step_ms["total"] = 1000 * train["epoch_time_s"] / steps
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": train["train_loss"],
        "train_accuracy": train["train_accuracy"],
        "val_loss": val["val_loss"],
        "val_accuracy": val["val_accuracy"],
        "epoch_time_s": train["epoch_time_s"],
        "eval_time_s": eval_s,
        "steps_per_worker": train["steps"],
        "optimizer_steps": train["optimizer_steps"],
        "train_samples": train["train_samples"],
        "val_samples": val["val_samples"],
        "samples_per_s": train["train_samples"] / train["epoch_time_s"],
        "step_ms": step_ms,
        "sync_fraction": train["phase_s"]["sync"] / train["epoch_time_s"],
    }


def _save(cfg: TrainConfig, ctx: RankContext, model, optimizer, scheduler, epoch: int, global_step: int,
          history: list[dict]) -> None:
    """Rank 0 writes the checkpoint of a finished epoch, with every rank's RNG state."""
    rng = torch.get_rng_state()
    if ctx.world_size > 1:
        states: list[Any] = [None] * ctx.world_size
        torch.distributed.all_gather_object(states, rng)
    else:
        states = [rng]
    if ctx.is_main:
        save_checkpoint(cfg.checkpoint_dir, {
            "epoch": epoch, "global_step": global_step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
            "rng": states, "config": cfg.to_dict()}, keep=cfg.keep_checkpoints)


def fit(cfg: TrainConfig, ctx: RankContext, data: tuple[Split, Split] | None = None,
        on_epoch_end: Callable[[dict], None] | None = None, progress: bool = False,
        notify: Callable[[str, Any], None] | None = None) -> FitOutput:
    """Train ``cfg.epochs`` epochs on this rank and return the (global) history.

    ``on_epoch_end(row)`` runs on rank 0 after each epoch; ``notify(kind, payload)``
    reports other events (an injected fault) from any rank.
    """
    train_split, test_split = data or load_datasets(cfg.dataset, cfg.data_dir, cfg.train_subset,
                                                    cfg.test_subset, cfg.seed)
    train_split = train_split.head(cfg.train_subset).to(ctx.device)  # subsets apply to passed-in data too
    test_split = test_split.head(cfg.test_subset).to(ctx.device)
    model = build_model(cfg, ctx.device)
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout masks differ between ranks
    optimizer, optimizer_impl = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    history: list[dict[str, Any]] = []
    start_epoch = global_step = 0
    notes: list[str] = []
    if cfg.resume:
        state, notes = latest_good_checkpoint(cfg.checkpoint_dir, cfg.to_dict())
        if state is not None:  # restore before the sync strategy broadcasts rank 0's weights
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, global_step, history = state["epoch"], state["global_step"], state["history"]
            torch.set_rng_state(state["rng"][ctx.rank])
        else:
            notes.append(f"no usable checkpoint in {cfg.checkpoint_dir}: started from scratch")
    sync = make_sync(cfg.sync, model, optimizer, ctx.world_size, ctx.device, cfg.local_sgd_every)
    warmup = (lambda step: min(1.0, (step + 1) / cfg.warmup_steps)) if cfg.warmup_steps else None
    fault = fault_injector(cfg, ctx.rank, notify)
    for epoch in range(start_epoch, cfg.epochs):
        indices = train_indices(len(train_split), ctx.rank, ctx.world_size, epoch, cfg.seed)
        bar = _progress_bar(cfg, epoch, len(indices)) if progress and ctx.is_main else None
        lr = optimizer.param_groups[0]["lr"]
        eval_idx = eval_indices(len(test_split), ctx.rank, ctx.world_size)
        steps, before_step = _steps_in_epoch(cfg, len(indices)), _chain(fault, bar)
        parts, evals, eval_s, train_s, done = [], [], 0.0, 0.0, 0
        for end in eval_points(steps, cfg.evals_per_epoch, cfg.accumulation_steps):
            chunk = indices[done * cfg.batch_size:end * cfg.batch_size]
            parts.append(train_one_epoch(sync, optimizer, train_split, chunk, cfg.batch_size, reduce=ctx.reduce,
                                         accumulation_steps=cfg.accumulation_steps, lr_scale=warmup,
                                         before_step=before_step, step_offset=global_step + done))
            done, train_s = end, train_s + parts[-1]["epoch_time_s"]
            start = time.perf_counter()
            val = evaluate(model, test_split, eval_idx, reduce=ctx.reduce)
            eval_s += time.perf_counter() - start
            evals.append({"epoch_fraction": done / steps, "train_time_s": train_s,
                          "val_accuracy": val["val_accuracy"], "val_loss": val["val_loss"]})
        if bar is not None:
            bar.close()
        train = merge_parts(parts)
        global_step += train["steps"]
        row = epoch_row(epoch + 1, lr, train, val, eval_s)
        row["evals"] = evals
        scheduler.step()
        history.append(row)
        if cfg.checkpoint_dir:
            _save(cfg, ctx, model, optimizer, scheduler, epoch + 1, global_step, history)
        if on_epoch_end is not None and ctx.is_main:
            on_epoch_end(row)
        if cfg.stop_at_accuracy and max(e["val_accuracy"] for e in evals) >= cfg.stop_at_accuracy:
            break  # every rank sees the same all-reduced accuracies, so all stop together
    runtime = {
        "rank_count": ctx.world_size,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "threads_per_rank": ctx.threads,
        "sync": sync.name,
        "optimizer": f"Adam ({optimizer_impl})",
        "parameters": count_parameters(model),
        "train_samples": len(train_split),
        "test_samples": len(test_split),
        "global_batch": cfg.batch_size * ctx.world_size * cfg.accumulation_steps,
        "resume": notes,
    }
    return FitOutput(history, runtime, model)
