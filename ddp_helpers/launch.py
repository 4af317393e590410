"""Run training: in this process (world size 1), in spawned workers, or as one rank of torchrun or srun.

``launch(config)`` is the one entry point, and every run takes one path through it:
``prepare`` (what can fail before any work), ``reporting`` (the live report, the journal and
the caller's ``on_event``), each rank's :func:`run_rank` (its context, then ``fit``), and rank
0's output made into the record by :func:`ddp_helpers.results.run_result`. Only who starts the
ranks differs: this process, :func:`ddp_helpers.workers.run_workers` (spawn; each worker runs
:func:`train_job`, its events come back over a pipe), or torchrun/srun (no parent hears the
ranks: they leave heartbeats and failures in the rendezvous store, :mod:`ddp_helpers.cluster`).
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from .checkpoint import CheckpointError, list_checkpoints
from .config import TrainConfig
from .data import Split, ensure_mnist
from .cluster.env import RankPlace
from .cluster.store import culprit_in_store, mark_failed, store_emit, torchrun_store
from .dist import (RankContext, check_devices, oversubscription_warning, pick_backend, pick_device, process_group,
                   single_process, tcp_store, threads_for)
from .engine import NonFiniteLossError
from .events import Event, Handler
from .report import Journal, LiveReport
from .results import RunResult, cpu_state, run_result, state_bytes, state_from_bytes
from .trainer import Emit, fit
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
def rank_context(cfg: TrainConfig, place: RankPlace, store: dist.Store | None) -> Iterator[RankContext]:
    """A rank's context, with the backend, device and threads chosen for its node: a process
    group when there is a store, else the single process (no group, no DDP)."""
    threads, rule = threads_for(cfg.threads_per_rank, place.local_world_size)
    if store is None:
        with single_process(pick_device(cfg.device, "none", 0), threads, rule) as ctx:
            yield ctx
        return
    backend = pick_backend(cfg.backend, place.local_world_size, cfg.device)
    with process_group(place.rank, place.world_size, store, backend=backend, threads=threads, threads_rule=rule,
                       device=pick_device(cfg.device, backend, place.local_rank), timeout_s=cfg.timeout_s,
                       restart_count=place.restart_count) as ctx:
        yield ctx


def run_rank(cfg: TrainConfig, place: RankPlace, store: dist.Store | None, emit: Emit,
             data: tuple[Split, Split] | None = None) -> tuple[list, dict, dict]:
    """One rank of a run, whoever started it (this process, spawn, torchrun, srun): its context,
    then ``fit``. Returns (history, runtime, weights on the CPU). Under an external launcher a
    rank that fails says so in the store before it leaves the process group, and one that fails
    because of another raises a WorkerError naming that rank."""
    with rank_context(cfg, place, store) as ctx:
        if place.external and cfg.dataset == "mnist":
            dist.barrier()  # one download per machine, by its local rank 0 (in prepare)
        try:
            out = fit(cfg, ctx, emit, data=data)
        except Exception as exc:
            if place.external:
                blame_in_store(store, place, exc)
            raise
    return out.history, out.runtime, cpu_state(out.model)


def blame_in_store(store: dist.Store, place: RankPlace, exc: Exception) -> None:
    """Under torchrun or srun: raise the error naming the rank that made this one fail, or leave
    this rank's own failure in the store for the others (and return)."""
    culprit = None if isinstance(exc, OWN_ERRORS) else culprit_in_store(store, place.rank, place.world_size, exc)
    if culprit is not None:
        raise culprit from None  # the waiting rank's own error is in its details
    mark_failed(store, place.rank, exc)


def spawned_place(rank: int, world_size: int) -> RankPlace:
    return RankPlace(rank, world_size, rank, world_size, 0, "spawn", "", 0, launcher="spawn")


def train_job(rank: int, world_size: int, init_method: str, emit: Emit, cfg_dict: dict) -> None:
    """One spawned rank: ``run_rank`` with the store at the parent's address; rank 0 sends its result."""
    cfg = TrainConfig.from_dict(cfg_dict)
    store = tcp_store(init_method, rank, world_size, cfg.timeout_s)
    history, runtime, state = run_rank(cfg, spawned_place(rank, world_size), store, emit)
    if rank == 0:
        emit("result", {"history": history, "runtime": runtime, "state": state_bytes(state)})


def in_spawned_workers(cfg: TrainConfig, handle: Handler, quiet: bool) -> tuple[list, dict, dict]:
    results = run_workers(train_job, cfg.world_size, (cfg.to_dict(),), master_addr=cfg.master_addr,
                          master_port=cfg.master_port, launch_timeout_s=cfg.launch_timeout_s, quiet=quiet,
                          on_event=handle)
    if 0 not in results:
        raise RuntimeError("all workers exited cleanly but rank 0 sent no result")
    return results[0]["history"], results[0]["runtime"], state_from_bytes(results[0]["state"])


def as_launched_rank(cfg: TrainConfig, env: RankPlace, handle: Handler) -> tuple[list, dict, dict]:
    store = torchrun_store(env, cfg.timeout_s)
    try:
        return run_rank(cfg, env, store, store_emit(store, env.rank, handle))
    finally:
        del store  # close the store client now, not during interpreter teardown


def launch(cfg: TrainConfig, on_event: Handler | None = None, *, live: bool | str = "auto",
           journal: str | Path | None = None, quiet_workers: bool = True, data: tuple[Split, Split] | None = None,
           env: RankPlace | None = None) -> RunResult | None:
    """Train and return rank 0's result: in this process (world size 1), in ``cfg.world_size``
    spawned workers, or, given ``env`` (:func:`ddp_helpers.cluster.env.torchrun_env`), as one rank
    of a torchrun or srun job (None on ranks other than 0).

    ``on_event(event)`` sees every event (``progress``, ``epoch``, ``fault``, ...) as it arrives.
    ``live``: "auto" shows a progress bar and each epoch's row in a notebook or terminal (nothing
    elsewhere); False shows nothing. ``journal``: a file that receives each epoch's row as it
    arrives. Worker output goes to per-rank log files; ``quiet_workers=False`` also copies it to
    this process's stderr. ``data``: (train, test) splits already in memory (a single process only).
    """
    if data is not None and (cfg.world_size != 1 or env is not None):
        raise ValueError("data= is for a run in this process (world_size=1); spawned ranks load MNIST themselves")
    cfg = attempt_config(cfg, env) if env is not None else cfg
    local_ranks, main = (env.local_world_size, env.rank == 0) if env else (cfg.world_size, True)
    start = time.perf_counter()
    with errors_to_torchrun(env):
        prepare(cfg, local_ranks, fetch_data=data is None and (env is None or env.local_rank == 0))
        with reporting(on_event if main else None, live if main else False, journal if main else None,
                       cfg.resume) as handle:
            if env is not None:
                history, runtime, state = as_launched_rank(cfg, env, handle)
            elif cfg.world_size == 1:
                history, runtime, state = run_rank(cfg, spawned_place(0, 1), None,
                                                   lambda kind, payload: handle(Event(0, kind, payload)), data)
            else:
                history, runtime, state = in_spawned_workers(cfg, handle, quiet_workers)
    if not main:
        return None
    return run_result(cfg, history, runtime, state, time.perf_counter() - start, oversubscription_warning(local_ranks))


def attempt_config(cfg: TrainConfig, env: RankPlace) -> TrainConfig:
    """This torchrun attempt's config: torchrun's world size, and a restarted attempt continues
    from the run's checkpoints where it keeps any (else it starts over)."""
    return cfg.replace(world_size=env.world_size, resume=cfg.resume or (env.restart_count > 0
                                                                       and bool(cfg.checkpoint_dir)))


@contextmanager
def errors_to_torchrun(env: RankPlace | None) -> Iterator[None]:
    """Under torchrun, the error a rank fails with goes to torchrun's error file too, so that its
    summary ("Root Cause") shows it rather than a bare exit code."""
    try:
        yield
    except Exception as exc:
        if env is not None:
            ErrorHandler().record_exception(exc)  # writes $TORCHELASTIC_ERROR_FILE; nothing when it is not set
        raise


def run_single_process(cfg: TrainConfig, data: tuple[Split, Split] | None = None, on_event: Handler | None = None,
                       *, live: bool | str = "auto", journal: str | Path | None = None) -> RunResult:
    """The baseline: ``launch`` in this process, on splits already in memory if given."""
    if cfg.world_size != 1:
        raise ValueError(f"run_single_process needs world_size=1, got {cfg.world_size}; use launch()")
    return launch(cfg, on_event, live=live, journal=journal, data=data)


__all__ = ["RunResult", "WorkerError", "launch", "prepare", "run_rank", "run_single_process", "train_job"]
