"""The one way this package writes a file that must never be seen half-written: records, weights,
checkpoints. A journal is the exception: it only ever appends whole lines."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from .errors import DiskFullError, SetupError

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; over the disk quota


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], what: str = "the file") -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path`` and
    fsync the folder. A crash or an error part-way leaves the previous file untouched and no
    temporary file behind; a full disk is a :class:`DiskFullError` naming ``what`` and the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in FULL:
            raise DiskFullError(path, what) from None
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def write_json(path: str | os.PathLike, value: Any, what: str = "the record") -> Path:
    """``value`` as indented JSON, atomically."""
    text = (json.dumps(value, indent=2, default=str) + "\n").encode()
    return atomic_write(path, lambda fh: fh.write(text), what)


def write_torch(path: str | os.PathLike, value: Any, what: str = "the weights") -> Path:
    """``torch.save(value)``, atomically. Serialised in memory first: torch's zip writer reports a
    full disk as "unexpected pos" rather than as the system's error, a plain write as ENOSPC."""
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return atomic_write(path, lambda fh: fh.write(buffer.getbuffer()), what)


def append_line(path: str | os.PathLike, line: str, what: str = "the journal") -> None:
    """Append one line (a journal's row): a crash loses at most that line."""
    path = Path(path)
    try:
        with open(path, "a") as fh:
            fh.write(line.rstrip("\n") + "\n")
    except OSError as exc:
        if exc.errno in FULL:
            raise DiskFullError(path, what) from None
        raise


@contextmanager
def held(lock: Path, what: str) -> Iterator[None]:
    """An exclusive lock on the file ``lock`` while the body runs, for the files of one run: a second run
    that asks for it is refused in one line, naming the process that holds it. The lock goes with
    its process however that ends (the kernel releases it); the file is removed on the way out."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise SetupError(f"another run (process {owner}) is writing {what} in {lock.parent}. Fix: wait for it to end, "
                         f"or pass another --run-name or --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()
