"""Every bad input we know of, tried for real: what the user gets, and what survives.

``try_bad_inputs(folder)`` builds each situation inside ``folder`` (copies of data,
checkpoints, a busy port), runs the public entry point a user would, and returns
one row per case: the error type and message, or what happened instead, and
whether the files that were good before are still byte-for-byte the same.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import latest_good_checkpoint, save_checkpoint
from ..config import TrainConfig
from ..data import RAW_FILES, ensure_mnist, raw_folder
from ..launcher import launch


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.md5(p.read_bytes()).hexdigest() for p in paths if p.exists()}


def _mnist_copy(source_root: Path, root: Path) -> Path:
    """A private copy of the four raw files (symlinks to the originals, which stay read-only)."""
    folder = raw_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        target = folder / name
        if not target.exists():
            target.symlink_to(raw_folder(source_root) / name)
    return folder


def _damage(folder: Path, name: str, how: str) -> Path:
    path = folder / name
    data = bytearray(path.read_bytes())
    path.unlink()  # replace the symlink by a damaged private copy
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _checkpoints(folder: Path, cfg: TrainConfig) -> list[Path]:
    import torch

    paths = []
    for epoch in (1, 2):
        state = {"epoch": epoch, "global_step": 0, "model": {"w": torch.zeros(2)}, "optimizer": {},
                 "scheduler": {}, "history": [], "rng": [torch.get_rng_state()], "config": cfg.to_dict()}
        paths.append(save_checkpoint(folder, state, keep=5))
    return paths


Case = tuple[str, Callable[[], list[Path]], Callable[[], Any]]  # description, setup -> protected files, action


def bad_input_cases(folder: Path, mnist_root: Path) -> list[Case]:
    """Every case as (description, setup, action). ``setup`` builds the situation and
    returns the files that must come out unchanged; ``action`` is what the user runs."""
    folder = Path(folder)
    tiny = dict(dataset="synthetic", train_subset=256, test_subset=64, epochs=1, launch_timeout_s=120)
    nothing: Callable[[], list[Path]] = list

    def damaged_mnist(name: str, how: str) -> Callable[[], list[Path]]:
        def setup() -> list[Path]:
            raw = _mnist_copy(mnist_root, folder / f"mnist_{how}")
            _damage(raw, name, how)
            return [raw / n for n in RAW_FILES]  # the damaged file is reported, not "repaired"
        return setup

    def checkpoints(sub: str, lr: float, truncate_newest: bool) -> Callable[[], list[Path]]:
        def setup() -> list[Path]:
            good, newest = _checkpoints(folder / sub, TrainConfig(lr=lr))
            if truncate_newest:
                newest.write_bytes(newest.read_bytes()[:100])
            return [good, newest]
        return setup

    def busy_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            return launch(TrainConfig(world_size=2, master_port=s.getsockname()[1], **tiny), live=False)

    def resume_past_a_corrupt_checkpoint():
        state, notes = latest_good_checkpoint(folder / "ckpt_corrupt", TrainConfig().to_dict())
        return f"resumes from the good epoch-{state['epoch']} checkpoint; note: {notes[0]}"

    def oversubscribed():
        return "ran; " + "; ".join(launch(TrainConfig(world_size=3, **tiny), live=False).record["runtime"]["notes"])

    def unwritable_checkpoint_dir():
        (folder / "a_file").write_text("not a folder")
        return launch(TrainConfig(world_size=2, checkpoint_dir=str(folder / "a_file" / "ckpt"), **tiny), live=False)

    return [
        ("world_size=0", nothing, lambda: TrainConfig(world_size=0)),
        ("batch_size=-4", nothing, lambda: TrainConfig(batch_size=-4)),
        ("lr=0", nothing, lambda: TrainConfig(lr=0.0)),
        ("hidden_sizes=[] (no hidden layer)", nothing, lambda: TrainConfig(hidden_sizes=[])),
        ("dropout=1.5", nothing, lambda: TrainConfig(dropout=1.5)),
        ("backend='mpi' (unknown)", nothing, lambda: TrainConfig(backend="mpi")),
        ("backend='nccl' without GPUs", nothing,
         lambda: launch(TrainConfig(backend="nccl", world_size=2, **tiny), live=False)),
        ("sync='magic' (unknown strategy)", nothing, lambda: TrainConfig(sync="magic")),
        ("resume without a checkpoint_dir", nothing, lambda: TrainConfig(resume=True)),
        ("data folder missing, download off (as offline)", nothing,
         lambda: ensure_mnist(folder / "empty_data_root", download=False)),
        ("truncated IDX file (train labels)", damaged_mnist("train-labels-idx1-ubyte", "truncate"),
         lambda: ensure_mnist(folder / "mnist_truncate", download=False)),
        ("IDX file with one byte flipped (test labels)", damaged_mnist("t10k-labels-idx1-ubyte", "flip"),
         lambda: ensure_mnist(folder / "mnist_flip", download=False)),
        ("busy port given explicitly (--master-port)", nothing, busy_port),
        ("newest checkpoint truncated", checkpoints("ckpt_corrupt", 1e-3, True), resume_past_a_corrupt_checkpoint),
        ("checkpoint of a different run (lr differs)", checkpoints("ckpt_other_run", 1e-3, False),
         lambda: latest_good_checkpoint(folder / "ckpt_other_run", TrainConfig(lr=5e-3).to_dict())),
        ("checkpoint_dir under a file (cannot be created)", nothing, unwritable_checkpoint_dir),
        ("world_size=3 on 2 cores", nothing, oversubscribed),
    ]


def try_bad_inputs(folder: str | Path, mnist_root: str | Path | None = None) -> list[dict[str, Any]]:
    """Run every case; one row each: input, outcome, error type, message, files intact."""
    folder = Path(folder)
    mnist_root = Path(mnist_root) if mnist_root else ensure_mnist()
    rows = []
    for description, setup, action in bad_input_cases(folder, mnist_root):
        protected = setup()
        before = _digest(protected)
        try:
            result = action()
            outcome, error, message = "accepted", "", str(result)
        except Exception as exc:  # the point is to see exactly what a user sees
            outcome, error, message = "refused", type(exc).__name__, str(exc).splitlines()[0]
        rows.append({"input": description, "outcome": outcome, "error": error,
                     "message": message.replace(str(folder), "<tmp>"),
                     "files intact": ("yes" if _digest(protected) == before else "NO") if protected else "no files"})
    return rows
