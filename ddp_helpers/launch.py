"""Run training: in this process (world size 1), in spawned workers, or as one rank of torchrun.

``launch(config)`` is the one entry point for notebooks and scripts. For world size > 1 it
spawns one process per rank, each running :func:`train_job`: join the process group, run
``fit``, send rank 0's result back. Workers call ``emit(kind, payload)``; the parent turns
each message into an :class:`~ddp_helpers.events.Event` and passes it to the same handlers
whatever the mode: a live report (bar and epoch rows), an optional journal file, and the
caller's ``on_event``. All three modes end in :func:`ddp_helpers.results.run_result`.
Under torchrun no parent hears the ranks: they leave heartbeats and failures in the
rendezvous store, and a rank that fails because of another names it.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from .checkpoint import CheckpointError, list_checkpoints
from .config import TrainConfig
from .data import Split, ensure_mnist
from .dist import (RankContext, TorchrunEnv, check_devices, oversubscription_warning, pick_backend, pick_device,
                   process_group, single_process, tcp_store, threads_for, torchrun_store)
from .engine import NonFiniteLossError
from .events import Event, Handler
from .report import Journal, LiveReport
from .results import RunResult, cpu_state, run_result, state_bytes, state_from_bytes
from .store_blame import culprit_in_store, mark_failed, store_emit
from .trainer import FitOutput, fit
from .workers import WorkerError, run_workers

# raised by this rank's own checks, never by waiting for a peer (a non-finite loss: every rank raises it together)
OWN_ERRORS = (CheckpointError, OSError, ValueError, NonFiniteLossError)


def check_checkpoint_dir(cfg: TrainConfig) -> None:
    """Before any work: the folder can be created and written, and a new run does not start on
    top of another run's checkpoints (which it would prune, and a later --resume would pick up)."""
    path = Path(cfg.checkpoint_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OSError(f"--checkpoint-dir {cfg.checkpoint_dir!r} cannot be used ({exc.strerror or exc}). "
                      f"Fix: pass a folder that can be created and written.") from None
    if not cfg.resume and list_checkpoints(path):
        raise ValueError(f"--checkpoint-dir {cfg.checkpoint_dir!r} already holds checkpoints. Fix: pass --resume to "
                         f"continue that run, or use an empty folder for a new one.")


def prepare(cfg: TrainConfig, local_ranks: int, fetch_data: bool = True) -> TrainConfig:
    """Everything that can fail before a worker starts: values, devices, folders, the data."""
    cfg.validate()
    check_devices(cfg.backend, cfg.device, local_ranks)
    if cfg.checkpoint_dir:
        check_checkpoint_dir(cfg)
    if fetch_data and cfg.dataset == "mnist":
        ensure_mnist(cfg.data_dir, cfg.download)
    return cfg


@contextmanager
def reporting(on_event: Handler | None, live: bool | str, journal: str | Path | None, resume: bool = False
              ) -> Iterator[Handler]:
    """One handler that passes each event to the live report, the journal and the caller.
    ``live``: "auto" = bar and rows in a notebook or terminal, nothing elsewhere; True = rows
    always, bar when interactive; "rows" = rows only; False = nothing."""
    report = LiveReport.for_mode(live)
    handlers = [h for h in (report, Journal(journal, append=resume) if journal else None, on_event) if h]
    try:
        yield lambda event: [handler(event) for handler in handlers]
    finally:
        if report is not None:
            report.close()


@contextmanager
def rank_context(cfg: TrainConfig, rank: int, world_size: int, local_rank: int, local_ranks: int, store,
                 restart_count: int = 0) -> Iterator[RankContext]:
    """A rank's process group, with the backend, device and threads chosen for this node."""
    backend = pick_backend(cfg.backend, local_ranks, cfg.device)
    threads, rule = threads_for(cfg.threads_per_rank, local_ranks)
    with process_group(rank, world_size, store, backend=backend, device=pick_device(cfg.device, backend, local_rank),
                       threads=threads, timeout_s=cfg.timeout_s, threads_rule=rule,
                       restart_count=restart_count) as ctx:
        yield ctx


def run_single_process(cfg: TrainConfig, data: tuple[Split, Split] | None = None, on_event: Handler | None = None,
                       *, live: bool | str = "auto", journal: str | Path | None = None) -> RunResult:
    """The baseline: the same ``fit`` in this process, no process group, no DDP."""
    if cfg.world_size != 1:
        raise ValueError(f"run_single_process needs world_size=1, got {cfg.world_size}; use launch()")
    prepare(cfg, 1, fetch_data=data is None)
    threads, rule = threads_for(cfg.threads_per_rank, 1)
    start = time.perf_counter()
    with reporting(on_event, live, journal, cfg.resume) as handle:
        with single_process(pick_device(cfg.device, "none", 0), threads, rule) as ctx:
            out = fit(cfg, ctx, lambda kind, payload: handle(Event(0, kind, payload)), data=data)
    return run_result(cfg, out.history, out.runtime, cpu_state(out.model), time.perf_counter() - start, [])


def train_job(rank: int, world_size: int, init_method: str, emit: Callable, cfg_dict: dict) -> None:
    """One spawned rank of a training run; rank 0 sends the result."""
    cfg = TrainConfig.from_dict(cfg_dict)
    store = tcp_store(init_method, rank, world_size, cfg.timeout_s)
    with rank_context(cfg, rank, world_size, rank, world_size, store) as ctx:
        out = fit(cfg, ctx, emit)
        if ctx.is_main:
            emit("result", {"history": out.history, "runtime": out.runtime, "state": state_bytes(cpu_state(out.model))})


def launch(cfg: TrainConfig, on_event: Handler | None = None, *, live: bool | str = "auto",
           journal: str | Path | None = None, quiet_workers: bool = True) -> RunResult:
    """Train with ``cfg.world_size`` processes and return rank 0's result.

    ``on_event(event)`` sees every event (``progress``, ``epoch``, ...) as it arrives.
    ``live``: "auto" shows a progress bar and each epoch's row in a notebook or terminal
    (nothing elsewhere); False shows nothing. ``journal``: a file that receives each epoch's
    row as it arrives. Worker output always goes to per-rank log files; ``quiet_workers=False``
    also copies it to this process's stderr as it arrives. Spawned runs are stopped after
    ``launch_timeout_s``.
    """
    if cfg.world_size == 1:
        return run_single_process(cfg, on_event=on_event, live=live, journal=journal)
    prepare(cfg, cfg.world_size)
    notes = oversubscription_warning(cfg.world_size)
    faults: list[dict] = []
    start = time.perf_counter()
    with reporting(on_event, live, journal, cfg.resume) as handle:
        def on_worker_event(event: Event) -> None:
            if event.kind == "fault":
                faults.append(event.payload)
            handle(event)

        try:
            results = run_workers(train_job, cfg.world_size, (cfg.to_dict(),), master_addr=cfg.master_addr,
                                  master_port=cfg.master_port, launch_timeout_s=cfg.launch_timeout_s,
                                  quiet=quiet_workers, on_event=on_worker_event)
        except WorkerError as exc:
            if faults:
                exc.fault = {**faults[0], "report_s": exc.detected_at - faults[0]["time"]}
            raise
    if 0 not in results:
        raise RuntimeError("all workers exited cleanly but rank 0 sent no result")
    done = results[0]
    return run_result(cfg, done["history"], done["runtime"], state_from_bytes(done["state"]),
                      time.perf_counter() - start, notes)


def attempt_config(cfg: TrainConfig, env: TorchrunEnv) -> TrainConfig:
    """This torchrun attempt's config: torchrun's world size, and a restarted attempt continues
    from the run's checkpoints where it keeps any (else it starts over)."""
    restarted = env.restart_count > 0 and bool(cfg.checkpoint_dir)
    return cfg.replace(world_size=env.world_size, resume=cfg.resume or restarted)


def fit_naming_the_culprit(cfg: TrainConfig, ctx: RankContext, store: dist.Store, handle: Handler) -> FitOutput:
    """``fit`` on a torchrun rank. One that fails by itself says so in the store before it leaves
    the process group; one that fails because of another raises a WorkerError naming that rank."""
    try:
        return fit(cfg, ctx, store_emit(store, ctx.rank, handle))
    except Exception as exc:
        culprit = None if isinstance(exc, OWN_ERRORS) else culprit_in_store(store, ctx.rank, ctx.world_size, exc)
        if culprit is None:
            mark_failed(store, ctx.rank, exc)
            raise
        raise culprit from None  # the waiting rank's own error is in the details


def attempt_rank(cfg: TrainConfig, env: TorchrunEnv, on_event: Handler | None, live: bool | str,
                 journal: str | Path | None) -> RunResult | None:
    """One rank of this torchrun attempt, from the checks to rank 0's result."""
    cfg = attempt_config(cfg, env)
    # one download per machine (the others wait in the barrier below); every rank checks the checkpoint folder
    prepare(cfg, env.local_world_size, fetch_data=env.local_rank == 0)
    start = time.perf_counter()
    store = torchrun_store(env, cfg.timeout_s)
    try:
        with reporting(on_event if env.rank == 0 else None, live if env.rank == 0 else False,
                       journal if env.rank == 0 else None, cfg.resume) as handle:
            with rank_context(cfg, env.rank, env.world_size, env.local_rank, env.local_world_size, store,
                              env.restart_count) as ctx:
                if cfg.dataset == "mnist":
                    dist.barrier()
                out = fit_naming_the_culprit(cfg, ctx, store, handle)
    finally:
        del store  # close the store client now, not during interpreter teardown
    if env.rank != 0:
        return None
    notes = oversubscription_warning(env.local_world_size)
    return run_result(cfg, out.history, out.runtime, cpu_state(out.model), time.perf_counter() - start, notes)


def run_torchrun(cfg: TrainConfig, env: TorchrunEnv, on_event: Handler | None = None, *, live: bool | str = "auto",
                 journal: str | Path | None = None) -> RunResult | None:
    """Run this process as one rank of a torchrun job; the result on global rank 0, else None.

    Each node may keep its own ``checkpoint_dir``: rank 0 writes checkpoints and chooses the
    one to resume from. The error a rank fails with goes to torchrun's error file, so that
    torchrun's summary ("Root Cause") shows it rather than a bare exit code.
    """
    try:
        return attempt_rank(cfg, env, on_event, live, journal)
    except Exception as exc:
        ErrorHandler().record_exception(exc)  # writes $TORCHELASTIC_ERROR_FILE; nothing when it is not set
        raise


__all__ = ["RunResult", "WorkerError", "launch", "prepare", "run_single_process", "run_torchrun", "train_job"]
