"""A spawned run's folder: each rank's log, which is its stdout and stderr from its first
instruction, and on request the Python stacks of a live rank (faulthandler, on SIGUSR2; SIGUSR1 is
the scheduler's warning of a stop, see preemption.py)."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

STACK_WAIT_S = 3.0
TAIL_LINES = 20


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr go to the file ``path`` while the body runs. A process
    started meanwhile inherits them: its file holds what it writes before any code of ours runs
    in it. Other threads' writes to file descriptors 1 and 2 would land there too: keep it short."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)


def stack_path(workdir: str | Path, rank: int) -> Path:
    return Path(workdir) / f"stack{rank}.txt"


def record_stacks(workdir: str, rank: int) -> None:
    """In a rank: a fatal signal leaves every thread's Python stack in its log, and SIGUSR2 (the
    parent asking) writes them to its stack file."""
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR2, file=open(stack_path(workdir, rank), "w"), all_threads=True)


class RunLogs:
    """The logs and stacks of one attempt's ranks, in its folder."""

    def __init__(self, workdir: Path, world_size: int, quiet: bool):
        self.workdir, self.quiet = workdir, quiet
        self.shown = [0] * world_size  # quiet=False: bytes of each log already copied to stderr

    def log(self, rank: int) -> Path:
        return self.workdir / f"rank{rank}.log"

    def output(self, rank: int) -> str:
        """All that a rank wrote to its stdout and stderr."""
        return self.log(rank).read_text(errors="replace") if self.log(rank).exists() else ""

    def tail(self, rank: int) -> str:
        return "\n".join(self.output(rank).splitlines()[-TAIL_LINES:])

    def show(self, final: bool = False) -> None:
        """quiet=False: copy what the ranks wrote since the last call to this process's stderr; whole
        lines only until the end, so that two ranks' lines do not mix."""
        if self.quiet:
            return
        for rank in range(len(self.shown)):
            if not self.log(rank).exists():  # that rank was never started
                continue
            with open(self.log(rank), "rb") as fh:
                fh.seek(self.shown[rank])
                new = fh.read()
            new = new if final else new[:new.rfind(b"\n") + 1]
            self.shown[rank] += len(new)
            sys.stderr.write(new.decode(errors="replace"))
        sys.stderr.flush()

    def stack(self, rank: int, pid: int) -> str:
        """Every thread's Python stack of a live rank (it may be frozen: SIGCONT lets the handler run)."""
        path = stack_path(self.workdir, rank)
        try:
            os.kill(pid, signal.SIGUSR2)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return "(the process is gone)"
        deadline = time.monotonic() + STACK_WAIT_S
        while time.monotonic() < deadline and not (path.exists() and path.stat().st_size):
            time.sleep(0.05)
        time.sleep(0.1)  # let the handler finish writing
        return path.read_text(errors="replace").rstrip() if path.exists() else "(no stack was written)"
