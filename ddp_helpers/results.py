"""Self-describing records, written in one place: each epoch's row, a run's runtime block and
summary, the header every record starts with (training runs, the study, the notebooks' exhibits),
its provenance (versions, hardware, code); and where records live."""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import TrainConfig
from .data import PROJECT_ROOT
from .files import write_json, write_torch
from .host import environment
from .model import MLP

RESULTS_DIR = PROJECT_ROOT / "results"


# --- the parts of a training record ------------------------------------------------------------------
def epoch_row(epoch: int, lr: float, train: dict, val: dict, train_s: float, eval_s: float, steps: int,
              optimizer_steps: int, phase_s: dict[str, float] | None, evals: list[dict]) -> dict[str, Any]:
    """One epoch as the journal, the live report and the record show it. ``phase_s``: seconds per
    phase of the steps (data, compute, sync, optimizer), as the engine's profiler measured them."""
    step_ms = {phase: 1000 * seconds / steps for phase, seconds in (phase_s or {}).items()}
    step_ms["total"] = 1000 * train_s / steps
    return {"epoch": epoch, "lr": lr, **train, **val, "epoch_time_s": train_s, "eval_time_s": eval_s,
            "steps_per_worker": steps, "optimizer_steps": optimizer_steps,
            "samples_per_s": train["train_samples"] / train_s, "step_ms": step_ms,
            "sync_fraction": phase_s["sync"] / train_s if phase_s is not None else None, "evals": evals}


def eval_point(done: int, steps: int, train_s: float, val: dict) -> dict[str, float]:
    """One validation pass inside an epoch: where (a fraction of the epoch) and after how much training."""
    return {"epoch_fraction": done / steps, "train_time_s": train_s, "val_accuracy": val["val_accuracy"],
            "val_loss": val["val_loss"]}


def runtime_block(*, rank_count: int, backend: str, device: str, dtype: str, precision: str, threads: int,
                  threads_rule: str,
                  sync: str, comm: str, buckets_bytes: list[int], optimizer: str, cuda_graph: bool,
                  cuda_graph_note: str, parameters: int, train_samples: int, test_samples: int, global_batch: int,
                  notes: list[str], peak_rss_mib_per_rank: list[float]) -> dict[str, Any]:
    """How a run ran: what the ranks chose and measured for themselves. ``comm``: how the gradients'
    all-reduces travelled; ``buckets_bytes``: the gradient buckets as the strategy really made them."""
    return {"rank_count": rank_count, "backend": backend, "device": device, "dtype": dtype, "precision": precision,
            "threads_per_rank": threads, "threads_rule": threads_rule, "sync": sync, "comm": comm,
            "buckets_bytes": buckets_bytes, "optimizer": optimizer,
            "cuda_graph": cuda_graph, "cuda_graph_note": cuda_graph_note, "parameters": parameters,
            "train_samples": train_samples, "test_samples": test_samples, "global_batch": global_batch,
            "notes": notes, "peak_rss_mib_per_rank": [round(mib, 1) for mib in peak_rss_mib_per_rank]}


def summary(history: list[dict]) -> dict[str, float]:
    times = [row["epoch_time_s"] for row in history]
    return {"final_val_accuracy": history[-1]["val_accuracy"],
            "best_val_accuracy": max(row["val_accuracy"] for row in history),
            "median_epoch_time_s": statistics.median(times), "total_train_time_s": sum(times),
            "median_step_ms": statistics.median(row["step_ms"]["total"] for row in history)}


# --- whole records ---------------------------------------------------------------------------------
def header(kind: str, **fields: Any) -> dict[str, Any]:
    """What every record starts with: its kind, when and by which command it was made, ``fields``
    (config, method, ...), and the environment it was made in."""
    return {"kind": kind, "created": now_iso(), "command": command_line(), **fields, "environment": environment()}


def finished_record(cfg: TrainConfig, history: list[dict], runtime: dict, wall_s: float, notes: list[str]) -> dict:
    """A run that finished (or stopped where every rank agreed, asked to by the scheduler: status
    "preempted"): header, runtime, every epoch, summary (single process, spawned, torchrun)."""
    status = "preempted" if runtime.get("preempted") else "ok"
    return {**header("train", status=status, config=cfg.to_dict()),
            "runtime": {**runtime, "wall_time_s": wall_s, "notes": notes + runtime.get("notes", [])},
            "epochs": history, "summary": summary(history) if history else None}


def failed_record(cfg: TrainConfig, error: BaseException | str, epochs: list[dict]) -> dict[str, Any]:
    """A run that stopped with an error: why, and the epochs the launching process heard finish. No
    summary, so that a chart expecting one fails instead of misleading."""
    return {**header("train", status="failed", config=cfg.to_dict()), "error": str(error), "epochs": epochs}


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
        """The trained MLP (on the CPU, in eval mode, in the run's precision)."""
        cfg = self.config
        model = MLP(cfg.hidden_sizes, cfg.dropout).to(getattr(torch, cfg.dtype))
        model.load_state_dict(self.state_dict)
        return model.eval()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the record; not the weights (:meth:`save_weights`): notebooks keep their models in memory."""
        return save_json(self.record, path or self.config.record_path)

    def save_weights(self, path: str | os.PathLike | None = None) -> Path:
        """Write rank 0's final weights (by default beside the record) as a state_dict of CPU tensors, for
        ``torch.load(path, weights_only=True)`` into ``MLP(cfg.hidden_sizes, cfg.dropout)``."""
        return write_torch(path or weights_path(self.config.record_path), self.state_dict)


def weights_path(record_path: str | os.PathLike) -> Path:
    """Where a record's final weights live: ``results/train_ws1.json`` -> ``results/train_ws1.pt``."""
    return Path(record_path).with_suffix(".pt")


def median_item(items: Sequence, key: Callable[[Any], float]) -> Any:
    """The item whose key is the median (the lower middle one of an even count; the first such item),
    whole: a round or an epoch whose parts add up to its total, which per-part medians need not."""
    middle = statistics.median_low([key(item) for item in items])
    return next(item for item in items if key(item) == middle)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def save_json(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a record as indented JSON, atomically."""
    return write_json(path, record)


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
