"""``launch(config)``: a run started from this process, the ranks' one path after it in ``rank.py``.

The world of one trains right here; a larger world in ``config.world_size`` spawned workers
(:func:`ddp_helpers.workers.run_workers`), each of which reads its place from the torchrun-style
variables it was given and runs :func:`train_job`. Under torchrun or srun, ``rank.launch_rank``
takes this module's place.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import TrainConfig
from .data import Split
from .dist import job_store, oversubscription_warning
from .errors import ConfigError
from .events import Handler
from .place import RankPlace, single_place
from .rank import prepare, reporting, run_rank
from .results import RunResult, finished_record
from .trainer import Emit
from .workers import run_workers, state_bytes, state_from_bytes


def train_job(place: RankPlace, emit: Emit, cfg_dict: dict) -> None:
    """One spawned rank: ``run_rank`` with its job's store; rank 0 sends its result."""
    cfg = TrainConfig.from_dict(cfg_dict)
    history, runtime, state = run_rank(cfg, place, job_store(place, cfg.timeout_s), emit)
    if place.rank == 0:
        emit("result", {"history": history, "runtime": runtime, "state": state_bytes(state)})


def launch(cfg: TrainConfig, on_event: Handler | None = None, *, live: bool | str = "auto",
           journal: str | Path | None = None, quiet_workers: bool = True,
           data: tuple[Split, Split] | None = None, fresh_process: bool = False) -> RunResult:
    """Train and return rank 0's result: in this process (world size 1), else in ``cfg.world_size``
    spawned workers.

    ``on_event(event)`` sees every event (``progress``, ``epoch``, ``fault``, ...) as it arrives.
    ``live``: "auto" shows a progress bar and each epoch's row in a notebook or terminal (nothing
    elsewhere); False shows nothing. ``journal``: a file that receives each epoch's row as it
    arrives. Worker output goes to per-rank log files; ``quiet_workers=False`` also copies it to
    this process's stderr. ``data``: (train, test) splits already in memory (world size 1 only).
    ``fresh_process``: world size 1 in one spawned worker too, started like DDP's (for timing
    one process against DDP's ranks like with like).
    """
    if data is not None and (cfg.world_size != 1 or fresh_process):
        raise ConfigError("data= is for a run in this process (world_size=1); spawned ranks load MNIST themselves")
    prepare(cfg, cfg.world_size, fetch_data=data is None)
    start = time.perf_counter()
    with reporting(on_event, live, journal) as heard:
        if cfg.world_size == 1 and not fresh_process:
            history, runtime, state = run_rank(cfg, single_place(), None, heard.emit_as(0), data)
        else:
            results = run_workers(train_job, cfg.world_size, (cfg.to_dict(),), master_addr=cfg.master_addr,
                                  master_port=cfg.master_port, launch_timeout_s=cfg.launch_timeout_s,
                                  quiet=quiet_workers, on_event=heard)
            history, runtime, state = results[0]["history"], results[0]["runtime"], state_from_bytes(
                results[0]["state"])
    record = finished_record(cfg, history, runtime, time.perf_counter() - start,
                             oversubscription_warning(cfg.world_size))
    return RunResult(record, state)


__all__ = ["launch", "train_job"]
