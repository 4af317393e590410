"""Self-describing records: what ran, where, with what, and what came out; and where they live."""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_save
from .config import TrainConfig
from .data import PROJECT_ROOT
from .host import environment
from .model import MLP

RESULTS_DIR = PROJECT_ROOT / "results"


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
        path = Path(path or weights_path(self.config.record_path))
        atomic_save(self.state_dict, path)
        return path


def weights_path(record_path: str | os.PathLike) -> Path:
    """Where a record's final weights live: ``results/train_ws1.json`` -> ``results/train_ws1.pt``."""
    return Path(record_path).with_suffix(".pt")


def record_header(cfg: TrainConfig, status: str) -> dict[str, Any]:
    """What every record starts with, finished or failed: what ran, where, and how it ended."""
    return {"kind": "train", "status": status, "created": now_iso(), "command": command_line(), "config": cfg.to_dict(),
            "environment": environment()}


def failed_record(cfg: TrainConfig, error: BaseException | str, epochs: list[dict]) -> dict[str, Any]:
    """The record of a run that stopped with an error: why, and the epochs it finished (from the
    journal: a spawned run's history dies with its workers). No summary, so that a chart expecting
    one fails instead of misleading."""
    return {**record_header(cfg, "failed"), "error": str(error), "epochs": epochs}


def run_result(cfg: TrainConfig, history: list[dict], runtime: dict, state_dict: dict[str, torch.Tensor],
               wall_s: float, notes: list[str]) -> RunResult:
    """The one place a finished run's record is put together (single process, spawned workers, torchrun)."""
    times = [row["epoch_time_s"] for row in history]
    record = {
        **record_header(cfg, "ok"),
        "runtime": {**runtime, "wall_time_s": wall_s, "notes": notes + runtime.get("notes", [])},
        "epochs": history,
        "summary": {
            "final_val_accuracy": history[-1]["val_accuracy"],
            "best_val_accuracy": max(row["val_accuracy"] for row in history),
            "median_epoch_time_s": statistics.median(times),
            "total_train_time_s": sum(times),
            "median_step_ms": statistics.median(row["step_ms"]["total"] for row in history),
        },
    }
    return RunResult(record, state_dict)


def state_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(data), weights_only=True)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def save_json(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a record as indented JSON (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
