"""What every rank runs, whoever started it: this process, ``launch``'s spawned workers, torchrun, srun.

:func:`prepare` (what can fail before any work), :func:`reporting` (the live report, the journal, the
caller's ``on_event``, and the rows heard), :func:`run_rank` (the rank's context, then ``fit``).
Under torchrun or srun no process is above the ranks: each runs :func:`launch_rank`, which reports
its failures to the job's store by the one protocol of ``failures.py``. This module never imports
the spawn supervisor (``workers.py``).
"""

from __future__ import annotations

import contextlib
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import errors as elastic

from .bounded import BoundedStore
from .checkpoint import check_checkpoint_dir
from .config import TrainConfig
from .data import Split, ensure_mnist
from .dist import (RankContext, attempt_store, check_devices, oversubscription_warning, pick_backend, pick_device,
                   process_group, single_process, threads_for)
from .errors import DDPError
from .events import Event, Handler
from .failures import Board, heartbeating, raise_for_culprit
from .files import held
from .place import RankPlace
from .report import Journal, LiveReport
from .results import RunResult, finished_record
from .trainer import Emit, fit
from .transport import open_transport


def prepare(cfg: TrainConfig, local_ranks: int, fetch_data: bool = True) -> TrainConfig:
    """Everything that can fail before a worker starts: devices, folders, values (once more: a field
    may have been set after the config was made), the data."""
    check_devices(cfg.backend, cfg.device, local_ranks)
    if cfg.checkpoint_dir:
        check_checkpoint_dir(cfg.checkpoint_dir, cfg.resume)
    cfg.validate()
    if fetch_data and cfg.dataset == "mnist":
        ensure_mnist(cfg.data_dir, cfg.download)
    return cfg


class Heard:
    """Every event to the live report, the journal and the caller; and the rows heard so far (a
    failed run's record is made of them)."""

    def __init__(self, handlers: list[Handler]):
        self.handlers, self.rows, self.training = handlers, [], False

    def __call__(self, event: Event) -> None:
        self.training = self.training or event.kind == "progress"  # a rank took its first step
        if event.rank == 0 and event.kind == "restored":
            self.rows = list(event.payload["history"])
        elif event.rank == 0 and event.kind == "epoch":
            self.rows.append(event.payload)
        for handler in self.handlers:
            handler(event)

    def emit_as(self, rank: int) -> Emit:
        """An ``emit`` for a rank that runs in this process."""
        return lambda kind, payload: self(Event(rank, kind, payload))


@contextmanager
def reporting(on_event: Handler | None, live: bool | str, journal: str | Path | None) -> Iterator[Heard]:
    """``live``: "auto" = bar and rows in a notebook or terminal, nothing elsewhere; True = rows
    always, bar when interactive; "rows" = rows only; False = nothing. A run that fails with one of
    our errors once training has begun carries the rows heard as ``error.history``. A run that writes a
    journal holds a lock beside it for its life: a second run on the same files is refused."""
    with held(Path(str(journal) + ".lock"), Path(journal).name) if journal else contextlib.nullcontext():
        report = LiveReport.for_mode(live)
        heard = Heard([h for h in (report, Journal(journal) if journal else None, on_event) if h])
        try:
            yield heard
        except DDPError as exc:
            if heard.training:
                exc.history = heard.rows
            raise
        finally:
            if report is not None:
                report.close()


@contextmanager
def rank_context(cfg: TrainConfig, place: RankPlace, store: dist.Store | None) -> Iterator[RankContext]:
    """A rank's context, with the backend, device and threads chosen for its node: a process
    group when there is a store, else the single process (no group, no DDP)."""
    threads, rule = threads_for(cfg.threads_per_rank, place.local_world_size, place.launcher)
    if store is None:
        with single_process(pick_device(cfg.device, "none", 0), threads, rule) as ctx:
            yield ctx
        return
    backend = pick_backend(cfg.backend, place.local_world_size, cfg.device)
    with process_group(place.rank, place.world_size, store, backend=backend, threads=threads, threads_rule=rule,
                       device=pick_device(cfg.device, backend, place.local_rank), timeout_s=cfg.timeout_s,
                       attempt=place.attempt) as ctx:
        ctx.transport = open_transport(cfg.comm, store, place.rank, ctx.gather(place.node), backend, ctx.device,
                                       cfg.timeout_s, label=f"ddp_helpers-{place.run_id}-attempt{place.attempt}")
        try:
            yield ctx
        finally:
            ctx.transport.close()


def run_rank(cfg: TrainConfig, place: RankPlace, store: dist.Store | None, emit: Emit,
             data: tuple[Split, Split] | None = None) -> tuple[list, dict, dict]:
    """One rank of a run, whoever started it: its context, then ``fit``. Returns (history, runtime,
    weights on the CPU)."""
    with rank_context(cfg, place, store) as ctx:
        if place.launcher in ("torchrun", "slurm") and cfg.dataset == "mnist":
            dist.barrier()  # one download per machine, by its local rank 0 (in prepare)
        out = fit(cfg, ctx, emit, data=data)
    return out.history, out.runtime, {k: v.detach().cpu().clone() for k, v in out.model.state_dict().items()}


@elastic.record  # torchrun's error file: its summary ("Root Cause") shows this error, not a bare exit code
def launch_rank(cfg: TrainConfig, place: RankPlace, *, live: bool | str = "rows", journal: str | Path | None = None,
                on_event: Handler | None = None) -> RunResult | None:
    """Train as one rank of a torchrun or srun job; rank 0 returns the result, the others None (or, when
    the job was asked to stop, their result too).
    A rank that fails says so in the job's store, and one that fails because of another raises a
    :class:`WorkerError` naming that rank."""
    store, place = attempt_store(place, cfg.timeout_s)  # the attempt, agreed by every rank in the store
    cfg, main = attempt_config(cfg, place), place.rank == 0
    prepare(cfg, place.local_world_size, fetch_data=place.local_rank == 0)
    start = time.perf_counter()
    with reporting(on_event if main else None, live if main else False, journal if main else None) as heard:
        board = Board(BoundedStore(store, cfg.timeout_s, f"the job's store at {place.master_addr}:{place.master_port}"),
                      place.world_size)
        board.present(place.rank)
        try:
            history, runtime, state = run_rank(cfg, place, store, heartbeating(board, place.rank,
                                                                               heard.emit_as(place.rank)))
            board.finish(place.rank)
        except Exception as exc:
            raise_for_culprit(board, place.rank, exc)
            raise
        finally:
            del board, store  # close the store client now, not during interpreter teardown
    if not main and "preempted" not in runtime:
        return None  # (a stopped rank returns its record too: its process must end with the same status)
    record = finished_record(cfg, history, runtime, time.perf_counter() - start,
                              oversubscription_warning(place.local_world_size))
    return RunResult(record, state)


def attempt_config(cfg: TrainConfig, place: RankPlace) -> TrainConfig:
    """This attempt's config: the launcher's world size, and a restarted attempt continues from the
    run's checkpoints where it keeps any (else it starts over)."""
    return cfg.replace(world_size=place.world_size, resume=cfg.resume or (place.attempt > 0
                                                                         and bool(cfg.checkpoint_dir)))


__all__ = ["launch_rank", "prepare", "reporting", "run_rank"]
