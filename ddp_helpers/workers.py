"""Spawned worker processes: start them, hear from them, stop them, and name the one that failed.

Each rank talks to the parent over its own pipe (no shared lock: a rank killed mid-message blocks no
other) as ``(kind, payload)``: ``started``, ``progress`` (its heartbeat), ``epoch``, ``fault``, ``result``,
``error``. Its output goes to its log file (worker_logs.py).

Blame rests on facts, not on the words of an error. A rank that fails by itself (raises, exits, is
killed) fails before its peers can notice, so the earliest failure is the own one. A rank that stops
making progress (hung, or frozen with SIGSTOP) fails nothing, its peers time out: so a live rank that
sent no error and whose heartbeat is clearly stale is named instead, with its stack.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import suppress
from multiprocessing import connection, resource_tracker
from pathlib import Path
from typing import Any, Callable

from .dist import check_port_free, find_free_port
from .events import Event
from .worker_logs import RunLogs, output_to, record_stacks

STOP_GRACE_S = 5.0
BLAME_GRACE_S = 2.0   # healthy ranks that wait for the same silent peer time out within this of each other
STALE_AFTER_S = 2.0   # four heartbeats missed (the trainer sends one every 0.5 s): more than a slow step
BOOTSTRAPPING = "bootstrapping phase"  # in multiprocessing's error for a process started while spawn imports main
MAIN_GUARD_FIX = ("the process could not start: spawn runs the main script again in every worker, and at its top "
                  "level the script starts workers again (multiprocessing's bootstrapping error below). Fix: put the "
                  "call that starts the run under `if __name__ == \"__main__\":` in the script")


class WorkerError(RuntimeError):
    """A worker failed; all were stopped (under torchrun by torchrun: ``pids`` is empty, ranks may be elsewhere)."""

    def __init__(self, rank: int, reason: str, pids: list[int], details: str = ""):
        self.rank, self.reason, self.pids, self.details = rank, reason, pids, details
        self.detected_at = time.time()
        stopped = f" All {len(pids)} workers were stopped." if pids else ""
        super().__init__(f"rank {rank} failed: {reason}.{stopped}" + (f"\n{details}" if details else ""))


def stopped_making_progress(last: dict | None, waiter: int) -> str:
    """The reason given for a silent rank, from its last heartbeat (a ``progress`` payload)."""
    where = (f"its last heartbeat was at step {last['step']} of epoch {last['epoch']}, "
             f"{time.time() - last['time']:.1f} s ago" if last else "it never sent a heartbeat")
    return f"stopped making progress ({where}); rank {waiter} timed out waiting for it"


def headline(exc: BaseException) -> str:
    """'SomeError: first line', from the innermost error when torch wraps one in another
    ('... Got the following error when running the callback: DistBackendError: ...')."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    marker = "when running the callback: "
    return text.split(marker, 1)[1] if marker in text else f"{type(exc).__name__}: {text}".rstrip(": ")


def exit_now(code: int) -> None:
    """End a worker whose work is delivered, skipping teardown (communication library threads may live on)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _worker_entry(rank: int, world_size: int, job: Callable, args: tuple, init_method: str, workdir: str,
                  pipe: Any) -> None:
    """A rank's first code of ours; its output already goes to its log (see ``output_to``)."""
    with suppress(OSError, AttributeError):  # die with the parent (a killed notebook kernel): PR_SET_PDEATHSIG
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    record_stacks(workdir, rank)

    def emit(kind: str, payload: Any) -> None:
        pipe.send((kind, payload))  # written synchronously: nothing is lost at exit

    emit("started", {"pid": os.getpid()})
    try:
        job(rank, world_size, init_method, emit, *args)
    except BaseException as exc:
        raised_at = getattr(exc, "raised_at", time.time())  # stamped by dist.process_group, before the rank left
        traceback.print_exc()
        emit("error", {"headline": headline(exc), "traceback": traceback.format_exc(), "time": raised_at,
                       "rank_at_fault": getattr(exc, "rank_at_fault", None)})  # an error that knows whose it is
        exit_now(1)
    exit_now(0)


def run_workers(job: Callable, world_size: int, args: tuple = (), *, master_addr: str = "127.0.0.1",
                master_port: int = 0, launch_timeout_s: float = 600.0, quiet: bool = True,
                on_event: Callable[[Event], None] | None = None) -> dict[int, Any]:
    """Spawn ``world_size`` processes running ``job`` (module-level: spawn imports it by name); return the
    ``result`` payloads by rank. ``on_event`` sees every event as it arrives; ``quiet=False`` copies the
    workers' output to stderr. A failure, a timeout or a Ctrl-C stops every worker before this raises."""
    if master_port:
        check_port_free(master_addr, master_port)
    attempts = 1 if master_port else 3
    for attempt in range(1, attempts + 1):
        init_method = f"tcp://{master_addr}:{master_port or find_free_port(master_addr)}"
        # the logs and stacks live in the folder: it is removed however the attempt ends (also by a signal)
        with tempfile.TemporaryDirectory(prefix="ddp_run_", ignore_cleanup_errors=True) as workdir:
            try:
                return _Run(job, world_size, args, init_method, Path(workdir), quiet, on_event).wait(launch_timeout_s)
            except WorkerError as exc:
                # a port found free can be taken by someone else before rank 0's store binds it
                if attempt == attempts or "EADDRINUSE" not in exc.details + exc.reason:
                    raise


class _Run:
    """One attempt: the processes, what they said, and how it ended."""

    def __init__(self, job: Callable, world_size: int, args: tuple, init_method: str, workdir: Path, quiet: bool,
                 on_event: Callable[[Event], None] | None):
        self.logs, self.on_event = RunLogs(workdir, world_size, quiet), on_event
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]  # (parent's reading end, worker's writing end)
        self.readers = {reader: rank for rank, (reader, _) in enumerate(pipes)}
        self.writers = [writer for _, writer in pipes]
        self.procs = [ctx.Process(target=_worker_entry, name=f"ddp-rank{rank}",  # not daemonic: may start loaders
                                  args=(rank, world_size, job, args, init_method, str(workdir), writer))
                      for rank, writer in enumerate(self.writers)]
        self.results, self.errors, self.heard = {}, {}, {}  # by rank: its result, its error, its last heartbeat
        self.kept = {"result": self.results, "error": self.errors, "progress": self.heard}  # where each kind is kept
        self.started: set[int] = set()  # ranks that sent anything: our code runs in them
        self.ended: dict[int, float] = {}  # rank -> a time it was surely alive, shortly before we saw it end
        self.alive_at = time.time()  # every rank not in ended was alive then (none has started yet)

    def start(self) -> None:
        resource_tracker.ensure_running()  # else the first start launches it, and it would inherit rank 0's log
        for rank, p in enumerate(self.procs):
            with output_to(self.logs.log(rank)):
                p.start()
        self.pids = [p.pid for p in self.procs]
        for writer in self.writers:
            writer.close()  # the workers hold the writing ends: a dead worker's pipe reads as closed

    def receive(self, reader) -> None:
        """Every message waiting in one rank's pipe, kept and passed on; a pipe whose writer died is closed."""
        try:
            while reader.poll():
                event = Event(self.readers[reader], *reader.recv())
                self.started.add(event.rank)  # it said something: our code runs in it
                kept = self.kept.get(event.kind)
                if kept is not None:
                    kept[event.rank] = event.payload
                if self.on_event is not None:
                    self.on_event(event)
        except (EOFError, OSError):  # the rank ended (perhaps in the middle of a message)
            del self.readers[reader]
            reader.close()

    def drain(self, timeout: float = 0.0) -> None:
        """What the ranks sent, and which ranks ended; waits up to ``timeout`` for either."""
        ends = {p.sentinel: rank for rank, p in enumerate(self.procs) if rank not in self.ended}
        now = time.time()  # taken before looking: a rank this look sees alive was alive at this time
        ready = connection.wait([*self.readers, *ends], timeout=timeout)
        for rank in [ends[c] for c in ready if c in ends]:
            self.ended[rank] = self.alive_at  # its peers notice its end only after it: before all they report
            self.procs[rank].join()  # at once: its end was seen
        self.alive_at = now
        for reader in [c for c in ready if c not in ends]:
            self.receive(reader)

    def wait(self, launch_timeout_s: float) -> dict[int, Any]:
        try:
            self.start()
            deadline = time.monotonic() + launch_timeout_s
            while len(self.ended) < len(self.procs):
                self.logs.show()
                self.drain(timeout=0.25)  # looking often times a failure without an error finely (see drain)
                if any(self.procs[rank].exitcode for rank in self.ended):
                    raise self.failure()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the run took longer than launch_timeout_s={launch_timeout_s:g} s; "
                                       f"all {len(self.procs)} workers were stopped")
            return self.results  # all of it: a rank's messages are read together with its end
        finally:
            stop(self.procs)
            for end in [*self.readers, *self.writers]:  # closing twice is harmless
                end.close()
            self.logs.show(final=True)

    def failure(self) -> WorkerError:
        """The error for a run in which a rank failed, once the others had BLAME_GRACE_S to fail
        too: the rank that failed by itself may be seen to end after the peers it took down."""
        deadline = time.monotonic() + BLAME_GRACE_S
        while len(self.ended) < len(self.procs) and time.monotonic() < deadline:
            self.drain(timeout=0.1)
        # (when, rank) of each failure: an error's own time, else a time it was alive (see drain); one host, one clock
        failed = sorted((self.errors.get(rank, {}).get("time", self.ended[rank]), rank)
                        for rank in self.ended if self.procs[rank].exitcode)
        for _, rank in failed:  # an error that knows whose it is wins
            at_fault = self.errors.get(rank, {}).get("rank_at_fault")
            if at_fault is not None:
                error = self.errors.get(at_fault, self.errors[rank])
                return WorkerError(at_fault, error["headline"], self.pids, error["traceback"].rstrip())
        first_at, first = failed[0]
        silent = self.silent(first_at)
        if not silent:
            return self.own_failure(first)
        # a rank that stopped making progress: its peers failed only because they waited for it
        culprit = min(silent, key=lambda rank: self.heard.get(rank, {}).get("time", 0.0))
        stack = self.logs.stack(culprit, self.procs[culprit].pid)
        return WorkerError(culprit, stopped_making_progress(self.heard.get(culprit), first), self.pids,
                           f"rank {first}: {self.what_failed(first)}\n\n"
                           f"Python stack of rank {culprit} when it was stopped:\n{stack}")

    def silent(self, since: float) -> list[int]:
        """Live ranks that sent no error and whose last heartbeat was clearly stale at ``since``, or
        that never sent one while others did (a job that sends none gives no such sign)."""
        return [rank for rank in range(len(self.procs)) if rank not in self.ended and rank not in self.errors
                and (since - self.heard[rank]["time"] > STALE_AFTER_S if rank in self.heard else bool(self.heard))]

    def what_failed(self, rank: int) -> str:
        code = self.procs[rank].exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return self.errors[rank]["headline"] if rank in self.errors else f"the process {how}"

    def own_failure(self, rank: int) -> WorkerError:
        if rank in self.errors:
            return WorkerError(rank, self.errors[rank]["headline"], self.pids, self.errors[rank]["traceback"].rstrip())
        tail = self.logs.tail(rank)
        if rank in self.started:
            return WorkerError(rank, f"{self.what_failed(rank)} without a Python exception", self.pids, tail)
        if BOOTSTRAPPING in self.logs.output(rank):
            return WorkerError(rank, MAIN_GUARD_FIX, self.pids, tail)
        return WorkerError(rank, f"{self.what_failed(rank)} while starting, before the job ran (its output below)",
                           self.pids, tail or "(it wrote nothing)")


def stop(procs: list) -> None:
    """SIGTERM every live worker (and SIGCONT: a frozen one would not act on it), SIGKILL what is left; reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
            with suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in [p for p in procs if p.pid is not None]:  # those started
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(STOP_GRACE_S)
