"""The one way this package writes a file that must never be seen half-written: records, weights,
checkpoints. A journal is the exception: it only ever appends whole lines."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path`` and
    fsync the folder. A crash or an error part-way leaves the previous file untouched and no
    temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """``value`` as indented JSON, atomically."""
    text = (json.dumps(value, indent=2, default=str) + "\n").encode()
    return atomic_write(path, lambda fh: fh.write(text))


def write_torch(path: str | os.PathLike, value: Any) -> Path:
    """``torch.save(value)``, atomically."""
    import torch

    return atomic_write(path, lambda fh: torch.save(value, fh))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a journal's row): a crash loses at most that line."""
    with open(path, "a") as fh:
        fh.write(line.rstrip("\n") + "\n")
