"""Checkpoints: atomic saves by rank 0, safe loading, resume from the latest good one.

A checkpoint holds model, optimizer and scheduler state, the epoch and step counters, the history,
every rank's RNG states and the config. On the CPU a resumed DDP run ends bit-identical to an
uninterrupted one; PowerSGD's error feedback and the other ranks' Adam moments under local SGD
are not saved, so those strategies resume close to, not exactly on, their trajectory.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DDPError, SetupError
from .files import write_torch

FORMAT = 1
NAME = re.compile(r"^ckpt_epoch(\d{4})(?:_step(\d{6}))?\.pt$")  # after an epoch, or stopped within the next
# Fields that define a run's trajectory: a checkpoint of a run that differs in any cannot be continued.
# The world size and the accumulation are not among them: DDP's state is the same on every rank, so a
# run resumes at another world size, keeping the global batch by accumulation where it can (resume.py).
MUST_MATCH = ("hidden_sizes", "dropout", "batch_size", "lr", "weight_decay", "lr_step", "lr_gamma", "seed", "dtype",
              "precision", "sync", "warmup_steps", "local_sgd_every", "dataset", "train_subset", "test_subset",
              "max_steps_per_epoch")


class CheckpointError(DDPError, RuntimeError):
    """A checkpoint cannot be used: corrupt, truncated, or from a different run."""


def checkpoint_path(folder: str | os.PathLike, epoch: int, step: int = 0) -> Path:
    """``epoch`` finished epochs, and ``step`` steps of the next (a stop within an epoch)."""
    return Path(folder) / (f"ckpt_epoch{epoch:04d}_step{step:06d}.pt" if step else f"ckpt_epoch{epoch:04d}.pt")


def position(path: Path) -> tuple[int, int]:
    """(finished epochs, steps of the next) of a checkpoint file: how far its run had come."""
    match = NAME.match(path.name)
    return int(match.group(1)), int(match.group(2) or 0)


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint files in the folder, newest (furthest) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if NAME.match(p.name)), key=position, reverse=True)


def check_checkpoint_dir(folder: str, resume: bool) -> None:
    """Before any work: the folder can be created and written, and a new run does not start on
    top of another run's checkpoints (which it would prune, and a later --resume would pick up)."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise SetupError(f"--checkpoint-dir {folder!r} cannot be used ({exc.strerror or exc}). "
                         f"Fix: pass a folder that can be created and written.") from None
    if not resume and list_checkpoints(path):
        raise ConfigError(f"--checkpoint-dir {folder!r} already holds checkpoints. Fix: pass --resume to "
                          f"continue that run, or use an empty folder for a new one.")


def save_checkpoint(folder: str | os.PathLike, state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of a finished epoch (or of a stop within one: ``state["progress"]``) and
    delete older ones beyond the newest ``keep``."""
    step = state.get("progress", {}).get("done", 0)
    path = checkpoint_path(folder, state["epoch"], step)
    older = [p for p in list_checkpoints(folder) if p != path and position(p) < (state["epoch"], step)]
    write_torch(path, {"format": FORMAT, **state}, "the checkpoint")  # atomic: the previous ones stay as they were
    for old in older[keep - 1:]:  # a newer run's checkpoints (a higher epoch) are never this run's to prune
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint safely, or raise CheckpointError naming the file and the cause."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # cannot read the file at all (permissions, I/O): not a reason to start from scratch
    except Exception as exc:  # truncated zip, bad pickle, foreign object, ...
        raise CheckpointError(f"checkpoint {path} cannot be read by torch.load ({type(exc).__name__}); "
                              f"it is corrupt or truncated") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this project (format {FORMAT})")
    return state


def check_compatible(state: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    saved = state["config"]
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs run {config.get(k)!r}"
            for k in MUST_MATCH if saved.get(k) != config.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {path} belongs to a different run ({', '.join(diff)}). Fix: resume with "
                              f"the same settings, or use another --checkpoint-dir for a new run.")


def latest_good_checkpoint(folder: str | os.PathLike, config: dict[str, Any]) -> tuple[dict | None, list[str]]:
    """The newest checkpoint that loads, checked against the run's config, or None; and notes.
    Unreadable files are skipped (and noted), never deleted; a readable checkpoint of a different
    run is an error, not something to skip past."""
    notes = []
    for path in list_checkpoints(folder):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            notes.append(f"skipped: {exc}")
            continue
        check_compatible(state, config, path)
        notes.append(f"resumed from {path} (end of epoch {state['epoch']})")
        return state, notes
    return None, notes
