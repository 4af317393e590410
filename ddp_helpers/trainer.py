"""The epoch loop: one function that every run goes through, on one rank or many.

``fit`` reads in three parts: :func:`build` (model, optimizer, scheduler, sync strategy, restored
from a checkpoint on resume), :func:`run_epoch` (training between evaluation points, each
evaluated; a loss that is no longer finite stops every rank together), and the runtime block
that :mod:`ddp_helpers.results` turns into the record. It reports through ``emit(kind, payload)``:
``progress`` about twice a second (the live bar, and the heartbeat that names a rank that stops),
``epoch`` after each epoch, ``restored`` with the history of a resumed run, ``fault`` for an
injected one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from . import faults
from .config import TrainConfig
from .cuda_graph import GraphedStep, captured_step
from .data import Split, batches, eval_indices, load_datasets, steps_per_epoch, train_indices
from .dist import RankContext
from .engine import NonFiniteLossError, Profiler, Tally, evaluate, make_optimizer, metrics, set_lr, step, warmup_scale
from .host import native_bf16, peak_rss_mib
from .model import MLP, count_parameters
from .results import epoch_row, eval_point, runtime_block
from .preemption import StopStep
from .resume import Restored, restore, save
from .sync import make_sync

Emit = Callable[[str, dict], None]
PROGRESS_EVERY_S = 0.5


@dataclass
class FitOutput:
    """What a rank hands back after training."""

    history: list[dict[str, Any]]
    runtime: dict[str, Any]
    model: torch.nn.Module


@dataclass
class Training:
    """What one rank trains with, built once by :func:`build`."""

    watch: "LossWatch"
    train_split: Split
    test_split: Split
    steps: int                       # per worker and epoch
    accumulate: int                  # micro-batches per optimizer step (a resize may change the config's)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_impl: str
    scheduler: Any
    profiler: Profiler
    lr_scale: Callable[[int], float] | None  # warm-up
    autocast: torch.dtype | None             # the forward pass's lower precision, if mixed
    sync: Any
    tally: Tally
    graph: GraphedStep | None
    graph_note: str
    stop: StopStep
    start_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    progress: dict | None = None     # a resumed stop within an epoch: how far it came, its sums so far


def build(cfg: TrainConfig, ctx: RankContext, data: tuple[Split, Split] | None = None) -> Training:
    """Data on this rank's device, the same initial weights on every rank, Adam, StepLR, the sync
    strategy; on resume, the state of the newest good checkpoint."""
    watch, dtype = LossWatch(ctx, cfg.lr), getattr(torch, cfg.dtype)
    train_split, test_split = data or load_datasets(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset,
                                                    cfg.seed)
    train_split = train_split.head(cfg.train_subset).to(ctx.device, dtype)  # subsets apply to passed-in data too
    test_split = test_split.head(cfg.test_subset).to(ctx.device, dtype)
    steps = steps_per_epoch(len(train_split), ctx.world_size, cfg.batch_size)
    steps = min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in the baseline
    model = MLP(cfg.hidden_sizes, cfg.dropout).to(ctx.device, dtype)
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout masks differ between ranks
    # on CUDA the same (capturable) Adam with or without the graph: the graph changes only how the step is launched
    optimizer, impl = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, capturable=ctx.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    profiler, lr_scale, tally = Profiler(ctx.device), warmup_scale(cfg.warmup_steps), Tally(ctx.device)
    restored = (restore(cfg.checkpoint_dir, cfg.to_dict(), ctx, model, optimizer, scheduler) if cfg.resume
                else Restored(accumulate=cfg.accumulation_steps))
    accumulate = restored.accumulate
    sync = make_sync(cfg.sync, model, optimizer, ctx.world_size, ctx.device, cfg.local_sgd_every,  # after restore:
                     profiler, ctx.transport, bucket_cap_mb=cfg.bucket_cap_mb,  # DDP broadcasts rank 0's weights
                     gradient_as_bucket_view=cfg.gradient_as_bucket_view, static_graph=cfg.static_graph)
    autocast = torch.bfloat16 if cfg.precision == "bf16-mixed" else None
    graph, graph_note = captured_step(cfg.cuda_graph, sync, optimizer, tally, train_split.images, train_split.labels,
                                      cfg.batch_size, ctx.world_size, accumulate, autocast)
    return Training(watch, train_split, test_split, steps, accumulate, model, optimizer, impl, scheduler, profiler,
                    lr_scale, autocast, sync, tally, graph, graph_note, StopStep(ctx.store, accumulate),
                    restored.epoch, restored.global_step, restored.history, restored.notes, restored.progress)


def fit(cfg: TrainConfig, ctx: RankContext, emit: Emit, data: tuple[Split, Split] | None = None) -> FitOutput:
    """Train ``cfg.epochs`` epochs on this rank and return the (global) history."""
    t = build(cfg, ctx, data)
    if t.history:
        emit("restored", {"history": t.history})
    stopped = None
    for epoch in range(t.start_epoch + 1, cfg.epochs + 1):
        row = run_epoch(t, cfg, ctx, emit, epoch)
        if row is None:  # a stop was asked for (preemption): keep the epoch so far, and end
            stopped = {"epoch": epoch, "step": t.progress["done"], "steps_in_epoch": t.steps}
            if cfg.checkpoint_dir:
                save(cfg.checkpoint_dir, cfg.keep_checkpoints, cfg.to_dict(), ctx, t.model, t.optimizer, t.scheduler,
                     epoch - 1, t.global_step, t.history, t.progress)
            break
        t.history.append(row)
        t.scheduler.step()
        if cfg.checkpoint_dir:
            save(cfg.checkpoint_dir, cfg.keep_checkpoints, cfg.to_dict(), ctx, t.model, t.optimizer, t.scheduler,
                 epoch, t.global_step, t.history)
        emit("epoch", row)
        if cfg.stop_at_accuracy and max(e["val_accuracy"] for e in row["evals"]) >= cfg.stop_at_accuracy:
            break  # every rank sees the same all-reduced accuracies, so all stop together
    runtime = runtime_block(
        rank_count=ctx.world_size, backend=ctx.backend, device=str(ctx.device), dtype=cfg.dtype,
        precision=cfg.precision if t.autocast is None else f"{cfg.precision} (forward under autocast to bfloat16; "
                                                             f"this CPU's native bfloat16: {native_bf16()})",
        threads=ctx.threads,
        threads_rule=ctx.threads_rule, sync=t.sync.name, comm=t.sync.comm, buckets_bytes=t.sync.bucket_sizes,
        optimizer=f"Adam ({t.optimizer_impl})",
        cuda_graph=t.graph is not None, cuda_graph_note=t.graph_note, parameters=count_parameters(t.model),
        train_samples=len(t.train_split), test_samples=len(t.test_split),
        global_batch=cfg.batch_size * ctx.world_size * t.accumulate, notes=t.notes,
        # each rank's process at its peak (a run in this process: all it held before the run too)
        peak_rss_mib_per_rank=ctx.gather(peak_rss_mib()))
    if stopped is not None:
        runtime["preempted"] = stopped
    return FitOutput(t.history, runtime, t.model)


def run_epoch(t: Training, cfg: TrainConfig, ctx: RankContext, emit: Emit, epoch: int) -> dict | None:
    """One epoch (1-based): train up to each evaluation point, evaluate there; the epoch's row. None
    when a stop was agreed within it: ``t.progress`` then holds how far it came (a resumed run starts
    from there, skipping the batches already done: their order is a function of seed and epoch)."""
    points, check_loss = eval_points(t.steps, cfg.evals_per_epoch, t.accumulate), t.watch.step_check(epoch)
    before_step = progress_and_fault(ctx, emit, epoch, t.steps, cfg.epochs * t.steps, 10 * cfg.timeout_s + 3600)
    lr, batch = float(t.optimizer.param_groups[0]["lr"]), cfg.batch_size
    indices = train_indices(len(t.train_split), ctx.rank, ctx.world_size, epoch - 1, cfg.seed)[:t.steps * batch]
    eval_idx = eval_indices(len(t.test_split), ctx.rank, ctx.world_size).to(t.test_split.images.device)
    so_far = t.progress or {"done": 0, "optimizer_steps": 0, "evals": [], "train_s": 0.0, "eval_s": 0.0,
                            "phase_s": {}}
    if t.progress:  # resumed within this epoch: its sums so far
        t.tally.sums.copy_(torch.tensor(t.progress["tally"][ctx.rank], dtype=t.tally.sums.dtype))
        t.progress = None
    evals, done, optimizer_steps = list(so_far["evals"]), so_far["done"], so_far["optimizer_steps"]
    train_s, eval_s, phase_s = so_far["train_s"], so_far["eval_s"], dict(so_far["phase_s"])
    for end in (p for p in points if p > done):
        start, chunk = time.perf_counter(), indices[done * batch:end * batch]
        steps_done, stepped = train_steps(t, batches(t.train_split, chunk, batch), end - done, t.global_step + done,
                                          t.accumulate, before_step, check_loss)
        train_s += time.perf_counter() - start
        done, optimizer_steps = done + steps_done, optimizer_steps + stepped
        if done < end:  # stopped at the agreed step
            phase_s = {k: phase_s.get(k, 0.0) + v for k, v in t.profiler.take().items()}
            t.progress = {"epoch": epoch, "done": done, "optimizer_steps": optimizer_steps, "evals": evals,
                          "train_s": train_s, "eval_s": eval_s, "phase_s": phase_s,
                          "tally": ctx.gather(t.tally.sums.tolist())}  # every rank's own sums, by rank
            return None
        start = time.perf_counter()
        t.watch.at_eval_point(t.tally, epoch, t.global_step + done - 1)  # before this epoch's checkpoint
        val = metrics(ctx.reduce(evaluate(t.model, t.test_split, eval_idx)["sums"]), "val")
        eval_s += time.perf_counter() - start
        evals.append(eval_point(done, t.steps, train_s, val))
    t.global_step += done
    train = metrics(ctx.reduce(t.tally.take()), "train")
    phase_s = {k: phase_s.get(k, 0.0) + v for k, v in t.profiler.take().items()}
    return epoch_row(epoch, lr, train, val, train_s, eval_s, done, optimizer_steps, phase_s, evals)


def train_steps(t: Training, steps: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int, first_step: int,
                accumulate: int, before_step: Callable[[int], None],
                check_loss: Callable[[torch.Tensor, int], None] | None) -> tuple[int, int]:
    """Train on the ``count`` given mini-batches: (micro-batches taken, optimizer steps taken).

    Every ``accumulate`` micro-batches make one optimizer step, synchronised on the last of them
    only. ``first_step`` is the run's count of micro-batches so far; the warm-up scales the rate of
    each optimizer step. A captured CUDA graph replays the step for each full batch; a step run
    eagerly has its loss checked (``check_loss``).
    """
    base_lrs = [float(group["lr"]) for group in t.optimizer.param_groups]
    t.sync.module.train()
    t.profiler.restart()
    done = optimizer_steps = 0
    for x, y in steps:
        if done % accumulate == 0 and t.stop.reached(first_step + done):
            break  # a stop agreed by every rank: before an optimizer step's first micro-batch
        before_step(first_step + done)
        t.profiler.lap("data")
        starts_step, ends_step = done % accumulate == 0, (done + 1) % accumulate == 0 or done + 1 == count
        if ends_step and t.lr_scale is not None:
            set_lr(t.optimizer, [lr * t.lr_scale(first_step // accumulate + optimizer_steps) for lr in base_lrs])
        if t.graph is not None and t.graph.fits(x):
            t.graph.step(x, y)                        # zero_grad, forward, backward, Adam: one replay
            t.profiler.lap("compute")
        else:
            loss = step(t.sync, t.optimizer, x, y, t.tally, t.profiler, starts_step=starts_step, ends_step=ends_step,
                        accumulate=accumulate, set_to_none=t.graph is None, autocast=t.autocast)
            if check_loss is not None:
                check_loss(loss, first_step + done)
        optimizer_steps += ends_step
        done += 1
    set_lr(t.optimizer, base_lrs)  # the epoch-level scheduler owns the base rate
    t.sync.consolidate()  # local SGD: average the pending steps, so that every rank evaluates one model
    t.profiler.lap("sync")
    return done, optimizer_steps


def progress_and_fault(ctx: RankContext, emit: Emit, epoch: int, steps: int, total_steps: int,
                       hang_s: float) -> Callable[[int], None]:
    """What runs before every step: a ``progress`` event every half second, and the planned fault
    of the test hook (:mod:`ddp_helpers.faults`), if this rank has one."""
    fault, last = faults.planned(ctx.rank, ctx.attempt), [0.0]

    def before_step(step: int) -> None:
        if fault is not None and step == fault.step:
            faults.fire(fault, emit, hang_s)
        if time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            emit("progress", {"step": step, "epoch": epoch, "steps_in_epoch": steps, "total_steps": total_steps,
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
