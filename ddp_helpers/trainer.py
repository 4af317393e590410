"""The epoch loop: one function that every run goes through, on one rank or many.

``fit`` builds the model, optimizer, scheduler and sync strategy (restoring them from a
checkpoint on resume), then runs the epochs: training between evaluation points, a
checkpoint after each epoch when asked to; a loss that is no longer finite stops the run
(every rank together). It reports through ``emit(kind, payload)``:
``progress`` about twice a second (the live bar, and the heartbeat that tells the launcher
which rank stopped), ``epoch`` after each epoch, ``fault`` for an injected one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import TrainConfig
from .cuda_graph import GraphedStep, graph_supported
from .data import Split, batches, eval_indices, load_datasets, steps_per_epoch, train_indices
from .dist import RankContext
from .engine import PHASES, NonFiniteLossError, Tally, evaluate, make_optimizer, metrics, train_steps, warmup_scale
from .host import peak_rss_mb
from .model import MLP, count_parameters
from .resume import restore, save
from .sync import make_sync

Emit = Callable[[str, dict], None]
PROGRESS_EVERY_S = 0.5


@dataclass
class FitOutput:
    """What a rank hands back after training."""

    history: list[dict[str, Any]]
    runtime: dict[str, Any]
    model: torch.nn.Module


def before_step_hook(cfg: TrainConfig, ctx: RankContext, emit: Emit, epoch: int, steps: int) -> Callable[[int], None]:
    """Runs before every step: a ``progress`` event every half second, and the injected fault
    (tests and demos: ``fail_rank`` fails at ``fail_step``; under torchrun on the first attempt
    only, so that an elastic restart can finish)."""
    fault = cfg.fail_rank == ctx.rank and ctx.restart_count == 0
    last = [0.0]

    def before_step(step: int) -> None:
        if fault and step == cfg.fail_step:
            emit("fault", {"rank": ctx.rank, "step": step, "kind": cfg.fail_kind, "time": time.time()})
            if cfg.fail_kind == "exit":
                os._exit(17)
            if cfg.fail_kind == "hang":
                time.sleep(10 * cfg.timeout_s + 3600)
            raise RuntimeError(f"injected fault: rank {ctx.rank} failed at step {step}")
        if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            emit("progress", {"step": step, "epoch": epoch, "steps_in_epoch": steps, "total_steps": cfg.epochs * steps,
                              "pid": os.getpid(), "time": time.time()})

    return before_step


class LossWatch:
    """Where the training loss first stopped being finite, found without stalling a GPU.

    On the CPU each step's loss is read: it is there already, so that costs next to nothing, and
    one process stops at that step. On CUDA the read would make the host wait for the GPU at every
    step (and a captured step's loss cannot be read at all), so the tally's loss sum is read at
    each evaluation point instead, and a non-finite sum is placed at the last step checked.
    Ranks stop together at the evaluation point, after one small all-reduce that tells every
    rank where each rank's loss went bad: a rank that stopped alone would leave the others
    waiting in their next collective.
    """

    def __init__(self, ctx: RankContext, lr: float):
        self.ctx, self.lr = ctx, lr
        self.per_step = ctx.device.type != "cuda"
        self.first_step: int | None = None  # this rank's first global step whose loss was not finite

    def step_check(self, epoch: int) -> Callable[[torch.Tensor, int], None] | None:
        """The per-step check for ``train_steps`` (None on CUDA)."""
        if not self.per_step:
            return None

        def check_loss(loss: torch.Tensor, step: int) -> None:
            if self.first_step is None and not torch.isfinite(loss):
                self.first_step = step
                if self.ctx.world_size == 1:
                    raise NonFiniteLossError(self.message(epoch, step, 0, step), 0)

        return check_loss

    def at_eval_point(self, tally: Tally, epoch: int, last_step: int) -> None:
        """Raise on every rank alike when any rank's loss has not been finite since the last check."""
        step = self.first_step
        if step is None and not torch.isfinite(tally.sums[0]):
            step = last_step
        if self.ctx.world_size == 1:
            found = [] if step is None else [(step, 0)]
        else:
            slots = torch.zeros(self.ctx.world_size, dtype=torch.long, device=tally.sums.device)
            slots[self.ctx.rank] = 0 if step is None else step + 1  # 0 = finite; the sum brings every slot to all
            found = [(s - 1, rank) for rank, s in enumerate(self.ctx.reduce(slots).tolist()) if s]
        if found:
            step, rank = min(found)
            raise NonFiniteLossError(self.message(epoch, step, rank, last_step), rank)

    def message(self, epoch: int, step: int, rank: int, last_step: int) -> str:
        where = (f"at epoch {epoch}, global step {step}" if self.per_step else
                 f"at epoch {epoch}, by global step {step} (the last step checked: on CUDA the loss is checked at "
                 f"each evaluation point, not at every step)")
        if self.ctx.world_size > 1:
            where += f" on rank {rank}; every rank stopped at the evaluation point after step {last_step}"
        return (f"the training loss was not finite (NaN or inf) {where}. Fix: lower the learning rate "
                f"(lr={self.lr:g}) or warm it up (warmup_steps)")


def eval_points(steps: int, evals: int, accumulation_steps: int = 1) -> list[int]:
    """The steps after which to evaluate: ``evals`` roughly equal parts of the epoch, each
    ending on an optimizer step; the last point is the epoch's end."""
    points = [(steps * j // evals) // accumulation_steps * accumulation_steps for j in range(1, evals)]
    return sorted({p for p in points if 0 < p < steps} | {steps})


def fit(cfg: TrainConfig, ctx: RankContext, emit: Emit, data: tuple[Split, Split] | None = None) -> FitOutput:
    """Train ``cfg.epochs`` epochs on this rank and return the (global) history."""
    dtype = getattr(torch, cfg.dtype)
    train_split, test_split = data or load_datasets(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset,
                                                    cfg.seed)
    train_split = train_split.head(cfg.train_subset).to(ctx.device, dtype)  # subsets apply to passed-in data too
    test_split = test_split.head(cfg.test_subset).to(ctx.device, dtype)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in the baseline
    model = MLP(cfg.hidden_sizes, cfg.dropout).to(ctx.device, dtype)
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout masks differ between ranks
    # on CUDA the same (capturable) Adam with or without the graph: the graph changes only how the step is launched
    optimizer, optimizer_impl = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay,
                                               capturable=ctx.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    start_epoch, global_step, history, notes = (
        restore(cfg.checkpoint_dir, cfg.to_dict(), ctx, model, optimizer, scheduler) if cfg.resume else (0, 0, [], []))
    sync = make_sync(cfg.sync, model, optimizer, ctx.world_size, ctx.device, cfg.local_sgd_every,  # after restore:
                     bucket_cap_mb=cfg.bucket_cap_mb, gradient_as_bucket_view=cfg.gradient_as_bucket_view,
                     static_graph=cfg.static_graph)  # DDP broadcasts rank 0's (restored) weights
    steps = steps_per_epoch(len(train_split), ctx.world_size, cfg.batch_size)
    steps = min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps
    tally, graph = Tally(ctx.device), None
    can_graph, graph_note = graph_supported(ctx.device, ctx.world_size, cfg.accumulation_steps)
    if cfg.cuda_graph and can_graph:
        x, y = next(batches(train_split, torch.arange(cfg.batch_size), cfg.batch_size))
        graph = GraphedStep(sync, optimizer, tally, x, y)
    eval_idx = eval_indices(len(test_split), ctx.rank, ctx.world_size).to(test_split.images.device)
    points, lr_scale = eval_points(steps, cfg.evals_per_epoch, cfg.accumulation_steps), warmup_scale(cfg.warmup_steps)
    watch = LossWatch(ctx, cfg.lr)
    for epoch in range(start_epoch, cfg.epochs):
        indices = train_indices(len(train_split), ctx.rank, ctx.world_size, epoch, cfg.seed)[:steps * cfg.batch_size]
        lr = float(optimizer.param_groups[0]["lr"])
        before_step, check_loss = before_step_hook(cfg, ctx, emit, epoch + 1, steps), watch.step_check(epoch + 1)
        phase_s, evals, done, optimizer_steps, train_s, eval_s = dict.fromkeys(PHASES, 0.0), [], 0, 0, 0.0, 0.0
        for end in points:
            start, chunk = time.perf_counter(), indices[done * cfg.batch_size:end * cfg.batch_size]
            part = train_steps(sync, optimizer, batches(train_split, chunk, cfg.batch_size), tally,
                               accumulate=cfg.accumulation_steps, lr_scale=lr_scale,
                               first_step=global_step + done, before_step=before_step, graph=graph,
                               check_loss=check_loss)
            train_s += time.perf_counter() - start
            phase_s = {p: phase_s[p] + part["phase_s"][p] for p in PHASES}
            done, optimizer_steps = end, optimizer_steps + part["optimizer_steps"]
            start = time.perf_counter()
            watch.at_eval_point(tally, epoch + 1, global_step + done - 1)  # before this epoch's checkpoint
            val = metrics(ctx.reduce(evaluate(model, test_split, eval_idx)["sums"]), "val")
            eval_s += time.perf_counter() - start
            evals.append({"epoch_fraction": done / steps, "train_time_s": train_s, "val_accuracy": val["val_accuracy"],
                          "val_loss": val["val_loss"]})
        train = metrics(ctx.reduce(tally.take()), "train")
        global_step += done
        step_ms = {p: 1000 * phase_s[p] / done for p in PHASES} | {"total": 1000 * train_s / done}
        history.append({"epoch": epoch + 1, "lr": lr, **train, **val, "epoch_time_s": train_s, "eval_time_s": eval_s,
                        "steps_per_worker": done, "optimizer_steps": optimizer_steps,
                        "samples_per_s": train["train_samples"] / train_s, "step_ms": step_ms,
                        "sync_fraction": phase_s["sync"] / train_s, "evals": evals})
        scheduler.step()
        if cfg.checkpoint_dir:
            save(cfg.checkpoint_dir, cfg.keep_checkpoints, cfg.to_dict(), ctx, model, optimizer, scheduler, epoch + 1,
                 global_step, history)
        emit("epoch", history[-1])
        if cfg.stop_at_accuracy and max(e["val_accuracy"] for e in evals) >= cfg.stop_at_accuracy:
            break  # every rank sees the same all-reduced accuracies, so all stop together
    runtime = {
        "rank_count": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device), "dtype": cfg.dtype,
        "threads_per_rank": ctx.threads, "threads_rule": ctx.threads_rule, "sync": sync.name,
        "optimizer": f"Adam ({optimizer_impl})", "cuda_graph": graph is not None,
        "cuda_graph_note": graph_note if cfg.cuda_graph else "off (config)",
        "parameters": count_parameters(model), "train_samples": len(train_split), "test_samples": len(test_split),
        "global_batch": cfg.batch_size * ctx.world_size * cfg.accumulation_steps, "notes": notes,
        # each rank's process at its peak (a run in this process: all it held before the run too)
        "peak_rss_mb_per_rank": [round(mb, 1) for mb in ctx.gather(peak_rss_mb())],
    }
    return FitOutput(history, runtime, model)
