"""Run training: in this process (world size 1), in spawned workers, or under torchrun.

``launch(config)`` is the one entry point for notebooks and scripts. For world size
> 1 it spawns one process per rank (the worker is a module-level function, so it can
be pickled by reference from a notebook), streams rank 0's per-epoch rows back to the
parent, and returns a :class:`RunResult`. The parent is the only process that prints.
A worker that fails, a run that overruns ``launch_timeout_s`` or a Ctrl-C stops every
worker before ``launch`` raises.
"""

from __future__ import annotations

import ctypes
import faulthandler
import io
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import TrainConfig
from .data import Split, ensure_mnist, resolve_data_root
from .dist import (check_port_free, find_free_port, oversubscription_warning, process_group,
                   single_process, torchrun_store)
from .model import MLP
from .results import command_line, environment, now_iso, save_json
from .trainer import fit

EpochCallback = Callable[[dict], None]
STOP_GRACE_S = 5.0


class WorkerError(RuntimeError):
    """A worker process failed; every other worker has been stopped."""

    def __init__(self, rank: int, reason: str, pids: list[int], details: str = ""):
        self.rank, self.reason, self.pids, self.details = rank, reason, pids, details
        self.detected_at = time.time()
        self.fault: dict | None = None  # set by launch when the failure was an injected fault
        super().__init__(f"rank {rank} failed: {reason}. All {len(pids)} workers were stopped."
                         + (f"\n{details}" if details else ""))


@dataclass
class RunResult:
    """A finished run: its self-describing record and rank 0's final weights."""

    record: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.record["epochs"]

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.record["config"])

    def model(self) -> torch.nn.Module:
        """The trained MLP (on the CPU, in eval mode)."""
        cfg = self.config
        model = MLP(cfg.hidden_sizes, cfg.dropout)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        return save_json(self.record, path or self.config.record_path)


def make_record(cfg: TrainConfig, history: list[dict], runtime: dict, wall_s: float,
                notes: list[str]) -> dict[str, Any]:
    times = sorted(row["epoch_time_s"] for row in history)
    return {
        "kind": "train",
        "created": now_iso(),
        "command": command_line(),
        "config": cfg.to_dict(),
        "environment": environment(),
        "runtime": {**runtime, "wall_time_s": wall_s, "notes": notes + runtime.get("resume", [])},
        "epochs": history,
        "summary": {
            "final_val_accuracy": history[-1]["val_accuracy"],
            "best_val_accuracy": max(row["val_accuracy"] for row in history),
            "median_epoch_time_s": times[len(times) // 2] if len(times) % 2 else
            (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2,
            "total_train_time_s": sum(times),
            "median_step_ms": sorted(row["step_ms"]["total"] for row in history)[len(history) // 2],
        },
    }


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _prepare(cfg: TrainConfig) -> TrainConfig:
    """Validate, and fetch/check the data once in the parent (never in racing workers)."""
    cfg.validate()
    if cfg.dataset == "mnist":
        root = ensure_mnist(cfg.data_dir, cfg.download)
        cfg = cfg.replace(data_dir=str(root))
    return cfg


def run_single_process(cfg: TrainConfig, data: tuple[Split, Split] | None = None,
                       on_epoch_end: EpochCallback | None = None, progress: bool = False) -> RunResult:
    """The baseline: the same ``fit`` in this process, no process group, no DDP."""
    if cfg.world_size != 1:
        raise ValueError(f"run_single_process needs world_size=1, got {cfg.world_size}; use launch()")
    cfg = _prepare(cfg) if data is None else cfg.validate()
    start = time.perf_counter()
    with single_process(cfg) as ctx:
        out = fit(cfg, ctx, data=data, on_epoch_end=on_epoch_end, progress=progress)
    return RunResult(make_record(cfg, out.history, out.runtime, time.perf_counter() - start, []),
                     _cpu_state(out.model))


# --- spawned workers ---------------------------------------------------------------------

def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the parent dies (e.g. a killed notebook kernel)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_entry(rank: int, world_size: int, job: Callable, args: tuple, init_method: str, workdir: str,
                  events: Any, quiet: bool) -> None:
    """Body of every spawned process: set up, run ``job``, record any error for the parent."""
    _die_with_parent()
    if quiet:  # keep worker output (and C++ library logs) out of notebook cells
        log = os.open(os.path.join(workdir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
    faulthandler.enable()  # a fatal signal (an abort in C++) leaves every thread's Python stack in the log
    try:
        job(rank, world_size, init_method, lambda kind, payload: events.put((rank, kind, payload)), *args)
    except BaseException:
        with open(os.path.join(workdir, f"error{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    exit_now(0)


def exit_now(code: int) -> None:
    """End a worker process whose work is done and delivered, without interpreter teardown.

    The process group is already destroyed and every message sent (the event queue writes
    synchronously). What is left is Python's finalisation, during which C++ threads of the
    communication library can still be alive; skipping it removes one way to abort at exit.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop(procs: list[mp.Process]) -> None:
    """SIGTERM every live worker, then SIGKILL what is left after a grace period; reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit))\b:?(.*)$")


def _exception_line(trace: str) -> str:
    """The last 'SomeError: message' line of a traceback, innermost cause first for wrapped
    errors ('Got the following error when running the callback: RuntimeError: ...')."""
    lines = [line for line in trace.splitlines() if _EXCEPTION_LINE.match(line)]
    if not lines:
        return trace.splitlines()[-1]
    line = lines[-1]
    while (inner := line.rfind("Error: ", 0, len(line) - 7)) > 0 and "Got the following error" in line:
        start = line.rfind(" ", 0, inner) + 1
        line = line[start:]
    return line


def _failure(rank: int, exitcode: int, workdir: Path, pids: list[int]) -> WorkerError:
    error_file = workdir / f"error{rank}.txt"
    if error_file.exists():
        trace = error_file.read_text().rstrip()
        return WorkerError(rank, _exception_line(trace), pids, trace)
    log = workdir / f"rank{rank}.log"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""
    how = f"killed by signal {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exited with code {exitcode}"
    return WorkerError(rank, f"the process {how} without a Python exception", pids, tail)


def run_workers(job: Callable, world_size: int, args: tuple = (), *, master_addr: str = "127.0.0.1",
                master_port: int = 0, launch_timeout_s: float = 600.0, quiet: bool = True,
                on_event: Callable[[int, str, Any], None] | None = None) -> dict[int, Any]:
    """Spawn ``world_size`` processes running ``job(rank, world_size, init_method, emit, *args)``.

    ``job`` must be a module-level function (spawn imports it by name). ``emit(kind,
    payload)`` sends a message to this process: ``on_event(rank, kind, payload)`` sees
    each one as it arrives, and the payloads of kind ``"result"`` are returned by rank.
    Any failure, a timeout or a Ctrl-C stops every worker before this raises.
    """
    if master_port:
        check_port_free(master_addr, master_port)
    attempts = 1 if master_port else 3
    for attempt in range(1, attempts + 1):
        init_method = f"tcp://{master_addr}:{master_port or find_free_port(master_addr)}"
        try:
            return _run_workers_once(job, world_size, args, init_method, launch_timeout_s, quiet, on_event)
        except WorkerError as exc:
            # a port found free can be taken by someone else before rank 0's store binds it
            if attempt == attempts or "EADDRINUSE" not in exc.details + exc.reason:
                raise


def _run_workers_once(job: Callable, world_size: int, args: tuple, init_method: str, launch_timeout_s: float,
                      quiet: bool, on_event: Callable[[int, str, Any], None] | None) -> dict[int, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ddp_run_"))
    ctx = mp.get_context("spawn")
    events = ctx.SimpleQueue()  # put() writes synchronously: nothing is lost if a worker dies right after
    procs = [ctx.Process(target=_worker_entry, name=f"ddp-rank{rank}",  # not daemonic: may start loaders
                         args=(rank, world_size, job, args, init_method, str(workdir), events, quiet))
             for rank in range(world_size)]
    results: dict[int, Any] = {}

    def drain() -> None:
        while not events.empty():
            rank, kind, payload = events.get()
            if kind == "result":
                results[rank] = payload
            if on_event is not None:
                on_event(rank, kind, payload)

    try:
        for p in procs:
            p.start()
        pids = [p.pid for p in procs]
        waiting = {p.sentinel: rank for rank, p in enumerate(procs)}
        deadline = time.monotonic() + launch_timeout_s
        while waiting:
            drain()
            for sentinel in mp.connection.wait(list(waiting), timeout=0.2):
                rank = waiting.pop(sentinel)
                procs[rank].join()
                if procs[rank].exitcode != 0:
                    drain()  # before stopping the others: no message is left half-written
                    _stop(procs)
                    raise _failure(rank, procs[rank].exitcode, workdir, pids)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run took longer than launch_timeout_s={launch_timeout_s:g} s; "
                                   f"all {world_size} workers were stopped")
        drain()  # a worker's queue is flushed into the pipe before it exits
    finally:
        _stop(procs)
        events.close()
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def _state_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(_cpu_state(model), buffer)
    return buffer.getvalue()


def _train_job(rank: int, world_size: int, init_method: str, emit: Callable, cfg_dict: dict,
               progress: bool) -> None:
    """One rank of a training run; rank 0 streams epoch rows and sends the result."""
    cfg = TrainConfig.from_dict(cfg_dict)
    with process_group(cfg, rank, world_size, rank, init_method) as ctx:
        out = fit(cfg, ctx, on_epoch_end=lambda row: emit("epoch", row), progress=progress and rank == 0,
                  notify=emit)
        if ctx.is_main:
            emit("result", {"history": out.history, "runtime": out.runtime, "state": _state_bytes(out.model)})


def launch(cfg: TrainConfig, on_epoch_end: EpochCallback | None = None, progress: bool = False,
           quiet_workers: bool = True) -> RunResult:
    """Train with ``cfg.world_size`` processes and return rank 0's result.

    ``on_epoch_end(row)`` is called in this process as rank 0 finishes each epoch.
    ``quiet_workers`` sends worker stdout/stderr to log files instead of this output.
    """
    if cfg.world_size == 1:
        return run_single_process(cfg, on_epoch_end=on_epoch_end, progress=progress)
    cfg = _prepare(cfg)
    notes = [n for n in [oversubscription_warning(cfg.world_size)] if n]

    faults: list[dict] = []

    def on_event(rank: int, kind: str, payload: Any) -> None:
        if kind == "epoch" and on_epoch_end is not None:
            on_epoch_end(payload)
        elif kind == "fault":
            faults.append(payload)

    start = time.perf_counter()
    try:
        results = run_workers(_train_job, cfg.world_size, (cfg.to_dict(), progress), master_addr=cfg.master_addr,
                              master_port=cfg.master_port, launch_timeout_s=cfg.launch_timeout_s,
                              quiet=quiet_workers, on_event=on_event)
    except WorkerError as exc:
        if faults:
            exc.fault = {**faults[0], "detect_s": exc.detected_at - faults[0]["time"]}
        raise
    if 0 not in results:
        raise RuntimeError("all workers exited cleanly but rank 0 sent no result")
    done = results[0]
    state = torch.load(io.BytesIO(done.pop("state")), weights_only=True)
    return RunResult(make_record(cfg, done["history"], done["runtime"], time.perf_counter() - start, notes), state)


# --- torchrun -----------------------------------------------------------------------------

def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "LOCAL_RANK" in os.environ)


def run_torchrun(cfg: TrainConfig, on_epoch_end: EpochCallback | None = None,
                 progress: bool = False) -> RunResult | None:
    """Run this process as one rank of a torchrun job (env:// rendezvous).

    Returns the result on global rank 0 and None elsewhere.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cfg = cfg.replace(world_size=world)
    if cfg.dataset == "mnist":
        cfg = cfg.replace(data_dir=str(resolve_data_root(cfg.data_dir)))
        if local_rank == 0:  # one download per machine; the others wait at the first collective
            ensure_mnist(cfg.data_dir, cfg.download)
    start = time.perf_counter()
    store = torchrun_store(rank, world, cfg.timeout_s)
    try:
        with process_group(cfg, rank, world, local_rank, store=store) as ctx:
            if cfg.dataset == "mnist":
                torch.distributed.barrier()
            out = fit(cfg, ctx, on_epoch_end=on_epoch_end, progress=progress)
    finally:
        del store  # close the store client now, not during interpreter teardown
    if rank != 0:
        return None
    notes = [n for n in [oversubscription_warning(int(os.environ.get("LOCAL_WORLD_SIZE", world)))] if n]
    return RunResult(make_record(cfg, out.history, out.runtime, time.perf_counter() - start, notes),
                     _cpu_state(out.model))


__all__ = ["RunResult", "WorkerError", "exit_now", "launch", "run_single_process", "run_torchrun", "run_workers",
           "under_torchrun"]
