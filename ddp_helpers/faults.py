"""A test hook, not a setting: make one rank fail at one step, to show and test what the user is told.

The plan travels in the environment variable ``DDP_HELPERS_FAULT`` (``RANK:STEP:KIND``, e.g.
``1:40:raise``), so that it reaches every rank however it is started: spawned workers and
torchrun's workers inherit it. It fires on a job's first attempt only, so that an elastic restart
can finish. Kinds: ``raise`` an exception, ``exit`` hard with ``os._exit(17)``, ``kill`` (SIGKILL
itself, as the out-of-memory killer would: no word, no exit code of its own), ``hang`` (sleep,
so that the other ranks' collective times out), ``preempt`` (ask for a stop, as the scheduler's
warning signal would: see preemption.py).
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import ConfigError

VARIABLE = "DDP_HELPERS_FAULT"
KINDS = ("raise", "exit", "kill", "hang", "preempt")


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int   # the global step (0-based, counted over the whole run) at which it fires
    kind: str

    def __str__(self) -> str:
        return f"{self.rank}:{self.step}:{self.kind}"


def planned(rank: int, attempt: int) -> Fault | None:
    """The fault this rank is to fail with, on this attempt; None for nearly every run."""
    text = os.environ.get(VARIABLE, "")
    if not text or attempt > 0:
        return None
    try:
        fault_rank, step, kind = text.split(":")
        fault = Fault(int(fault_rank), int(step), kind)
    except ValueError:
        fault = None
    if fault is None or kind not in KINDS:
        raise ConfigError(f"{VARIABLE}={text!r} is not RANK:STEP:KIND with KIND one of {KINDS}. "
                          f"Fix: unset it, or set it like 1:40:raise.")
    return fault if fault.rank == rank else None


def fire(fault: Fault, emit: Callable[[str, dict], None], hang_s: float) -> None:
    """Fail now, as planned (after saying so: the ``fault`` event times how soon it is reported)."""
    emit("fault", {"rank": fault.rank, "step": fault.step, "kind": fault.kind, "time": time.time()})
    if fault.kind == "preempt":
        from .preemption import request

        request()
        return
    if fault.kind == "exit":
        os._exit(17)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "hang":
        time.sleep(hang_s)
    raise RuntimeError(f"injected fault: rank {fault.rank} failed at step {fault.step}")


@contextmanager
def injected(rank: int, step: int, kind: str = "raise") -> Iterator[Fault]:
    """Within the block, runs started from this process (and their ranks) fail as planned."""
    fault = Fault(rank, step, kind)
    previous = os.environ.get(VARIABLE)
    os.environ[VARIABLE] = str(fault)
    try:
        yield fault
    finally:
        if previous is None:
            os.environ.pop(VARIABLE, None)
        else:
            os.environ[VARIABLE] = previous
