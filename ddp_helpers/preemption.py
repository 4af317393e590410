"""A scheduler's warning before it stops a job: stop at a step every rank agrees on, checkpoint there.

SLURM sends a signal some time before a job's end when asked (``#SBATCH --signal=USR1@90``: SIGUSR1
90 s before, to every task of the job's steps). Whichever process receives it (a rank, or the
process that spawned the ranks) leaves a request in the job's store; every ``CHECK_EVERY``
optimizer steps each rank looks there, and the first to see the request sets the stop step for all
(``compare_set``: one writer wins) two checks ahead, so that every rank, at most one step ahead of
the slowest, reads it before it gets there. A rank that decided alone would leave the others waiting
in their next collective. At that step rank 0 writes a checkpoint of the epoch so far and the job
ends with :data:`PREEMPTED_EXIT`, which the batch script turns into ``scontrol requeue``; the
requeued job resumes mid-epoch, skipping the batches already done (the batch order is a function of
the seed and the epoch).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist

SIGNAL = signal.SIGUSR1
CHECK_EVERY = 16      # optimizer steps between two looks at the store (a look is one round trip)
PREEMPTED_EXIT = 75   # EX_TEMPFAIL: "try again later"; the batch script requeues on it
_received = threading.Event()  # set by the signal handler of this process


def request() -> None:
    """Ask the run in this process to stop at the next agreed step (what the signal handler does)."""
    _received.set()


def requested() -> bool:
    return _received.is_set()


@contextmanager
def listening(enabled: bool = True) -> Iterator[None]:
    """While the body runs, SIGNAL asks for a stop instead of ending the process; restored after."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(SIGNAL, lambda signum, frame: request())
    try:
        yield
    finally:
        signal.signal(SIGNAL, previous if previous is not None else signal.SIG_DFL)


class StopStep:
    """The step a rank stops at, once a stop has been asked for anywhere in its job."""

    def __init__(self, store: dist.Store | None, accumulate: int = 1):
        self.store, self.accumulate, self.every, self.stop_at = store, accumulate, CHECK_EVERY * accumulate, None

    def reached(self, step: int) -> bool:
        """Called before each micro-batch with the run's count of them: whether to stop here (always
        before the first micro-batch of an optimizer step)."""
        if self.stop_at is None:
            if self.store is None:  # one process: nobody to agree with
                return requested() and step % self.accumulate == 0
            if step % self.every == 0:
                if requested():
                    self.store.set("preempt/requested", "1")
                if self.store.check(["preempt/requested"]):
                    proposal = str((step // self.every + 2) * self.every)
                    self.stop_at = int(self.store.compare_set("preempt/stop_at", "", proposal))
        return self.stop_at is not None and step >= self.stop_at

    @staticmethod
    def forward(store: dist.Store) -> None:
        """In a process that started the ranks: pass a stop asked of it on to them, through the store."""
        if requested():
            store.set("preempt/requested", "1")
