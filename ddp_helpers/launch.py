"""Run training: in this process (world size 1), in spawned workers, or as one rank of torchrun.

``launch(config)`` is the one entry point for notebooks and scripts. For world size > 1 it
spawns one process per rank, each running :func:`train_job`: join the process group, run
``fit``, send rank 0's result back. Whatever the mode, the same events reach the same
handlers in the parent: a live report (bar and epoch rows), an optional journal file, and
the caller's own ``on_event``. All three modes end in :func:`ddp_helpers.results.run_result`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .data import Split, ensure_mnist
from .dist import (TorchrunEnv, oversubscription_warning, pick_backend, pick_device, process_group, single_process,
                   tcp_store, threads_for, torchrun_store)
from .report import Journal, LiveReport, in_notebook
from .results import RunResult, cpu_state, run_result, state_bytes, state_from_bytes
from .trainer import fit
from .workers import Event, WorkerError, run_workers

Handler = Callable[[Event], None]


def check_writable(folder: str, what: str) -> None:
    """Fail before any work is spent when ``folder`` cannot be created or written."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OSError(f"{what} {folder!r} cannot be used ({exc.strerror or exc}). "
                      f"Fix: pass a folder that can be created and written.") from None


def prepare(cfg: TrainConfig) -> TrainConfig:
    """Validate, check that outputs can be written, and fetch/check the data once, in the parent."""
    cfg.validate()
    if cfg.checkpoint_dir:
        check_writable(cfg.checkpoint_dir, "--checkpoint-dir")
    if cfg.dataset == "mnist":
        ensure_mnist(cfg.data_dir, cfg.download)
    return cfg


def _handlers(on_event: Handler | None, live: bool | str, journal: str | Path | None) -> tuple[Handler, list]:
    """One function that passes each event to the live report, the journal and the caller.
    ``live``: "auto" = bar and rows in a notebook or terminal, nothing elsewhere; True = rows
    always, bar when interactive; "rows" = rows only; False = nothing."""
    interactive = in_notebook() or sys.stderr.isatty()
    report = None
    if live == "rows" or live is True or (live == "auto" and interactive):
        report = LiveReport(rows=True, bar=live != "rows")
    handlers = [h for h in (report, Journal(journal) if journal else None, on_event) if h is not None]

    def dispatch(event: Event) -> None:
        for handler in handlers:
            handler(event)

    return dispatch, [report] if report else []


def run_single_process(cfg: TrainConfig, data: tuple[Split, Split] | None = None, on_event: Handler | None = None,
                       *, live: bool | str = "auto", journal: str | Path | None = None) -> RunResult:
    """The baseline: the same ``fit`` in this process, no process group, no DDP."""
    if cfg.world_size != 1:
        raise ValueError(f"run_single_process needs world_size=1, got {cfg.world_size}; use launch()")
    cfg = prepare(cfg) if data is None else cfg.validate()
    dispatch, reports = _handlers(on_event, live, journal)
    threads, rule = threads_for(cfg.threads_per_rank, 1)
    start = time.perf_counter()
    try:
        with single_process(pick_device(cfg.device, "none", 0), threads, rule) as ctx:
            out = fit(cfg, ctx, lambda kind, payload: dispatch(Event(0, kind, payload)), data=data)
    finally:
        for report in reports:
            report.close()
    return run_result(cfg, out.history, out.runtime, cpu_state(out.model), time.perf_counter() - start, [])


def train_job(rank: int, world_size: int, init_method: str, emit: Callable, cfg_dict: dict) -> None:
    """One spawned rank of a training run; rank 0 sends the result."""
    cfg = TrainConfig.from_dict(cfg_dict)
    backend = pick_backend(cfg.backend, world_size)
    threads, rule = threads_for(cfg.threads_per_rank, world_size)
    store = tcp_store(init_method, rank, world_size, cfg.timeout_s)
    with process_group(rank, world_size, store, backend=backend, device=pick_device(cfg.device, backend, rank),
                       threads=threads, timeout_s=cfg.timeout_s, threads_rule=rule) as ctx:
        out = fit(cfg, ctx, emit)
        if ctx.is_main:
            emit("result", {"history": out.history, "runtime": out.runtime, "state": state_bytes(cpu_state(out.model))})


def launch(cfg: TrainConfig, on_event: Handler | None = None, *, live: bool | str = "auto",
           journal: str | Path | None = None, quiet_workers: bool = True) -> RunResult:
    """Train with ``cfg.world_size`` processes and return rank 0's result.

    ``on_event(event)`` sees every event (``progress``, ``epoch``, ...) as it arrives.
    ``live``: "auto" shows a progress bar and each epoch's row in a notebook or terminal
    (nothing elsewhere); False shows nothing. ``journal``: a file that receives each epoch's row as
    it arrives. ``quiet_workers`` sends worker output to log files instead of this output.
    """
    if cfg.world_size == 1:
        return run_single_process(cfg, on_event=on_event, live=live, journal=journal)
    cfg = prepare(cfg)
    notes = [n for n in [oversubscription_warning(cfg.world_size)] if n]
    faults: list[dict] = []
    dispatch, reports = _handlers(on_event, live, journal)

    def handle(event: Event) -> None:
        if event.kind == "fault":
            faults.append(event.payload)
        dispatch(event)

    start = time.perf_counter()
    try:
        results = run_workers(train_job, cfg.world_size, (cfg.to_dict(),), master_addr=cfg.master_addr,
                              master_port=cfg.master_port, launch_timeout_s=cfg.launch_timeout_s,
                              quiet=quiet_workers, on_event=handle)
    except WorkerError as exc:
        if faults:
            exc.fault = {**faults[0], "detect_s": exc.detected_at - faults[0]["time"]}
        raise
    finally:
        for report in reports:
            report.close()
    if 0 not in results:
        raise RuntimeError("all workers exited cleanly but rank 0 sent no result")
    done = results[0]
    return run_result(cfg, done["history"], done["runtime"], state_from_bytes(done["state"]),
                      time.perf_counter() - start, notes)


def run_torchrun(cfg: TrainConfig, env: TorchrunEnv, on_event: Handler | None = None, *, live: bool | str = "auto",
                 journal: str | Path | None = None) -> RunResult | None:
    """Run this process as one rank of a torchrun job; the result on global rank 0, else None."""
    cfg = cfg.replace(world_size=env.world_size)
    if cfg.checkpoint_dir:
        check_writable(cfg.checkpoint_dir, "--checkpoint-dir")
    if cfg.dataset == "mnist" and env.local_rank == 0:  # one download per machine; the others wait below
        ensure_mnist(cfg.data_dir, cfg.download)
    dispatch, reports = _handlers(on_event, live, journal) if env.rank == 0 else (lambda event: None, [])
    backend = pick_backend(cfg.backend, env.local_world_size)
    threads, rule = threads_for(cfg.threads_per_rank, env.local_world_size)
    start = time.perf_counter()
    store = torchrun_store(env, cfg.timeout_s)
    try:
        with process_group(env.rank, env.world_size, store, backend=backend,
                           device=pick_device(cfg.device, backend, env.local_rank), threads=threads,
                           timeout_s=cfg.timeout_s, threads_rule=rule, restart_count=env.restart_count) as ctx:
            if cfg.dataset == "mnist":
                import torch.distributed as dist

                dist.barrier()
            out = fit(cfg, ctx, lambda kind, payload: dispatch(Event(env.rank, kind, payload)))
    finally:
        del store  # close the store client now, not during interpreter teardown
        for report in reports:
            report.close()
    if env.rank != 0:
        return None
    notes = [n for n in [oversubscription_warning(env.local_world_size)] if n]
    return run_result(cfg, out.history, out.runtime, cpu_state(out.model), time.perf_counter() - start, notes)


__all__ = ["RunResult", "WorkerError", "launch", "prepare", "run_single_process", "run_torchrun", "train_job"]
