"""Spawned worker processes: start them, hear from them, stop them, and name the one that failed.

``run_workers(job, W)`` starts W processes running ``job(rank, W, init_method, emit, *args)``.
Everything a worker says travels to the parent over its own pipe as ``(kind, payload)``:
``started`` (its pid), ``progress`` (its heartbeat), ``epoch``, ``fault``, ``result`` and
``error`` (the exception, as text). One pipe per rank, so that no lock is shared: a rank
killed in the middle of a message cannot block the others. A worker's stdout and stderr
are its log file from its first instruction, so that an error before ``started`` (an
import, spawn running an unguarded script again) is kept and shown; with ``quiet=False``
the parent copies the logs to its own stderr as they grow. The parent shows the rest.

When a rank fails, the others are stopped and :class:`WorkerError` names the rank that
caused it. That is not always the rank that raised: a rank that stops making progress
(hung, or frozen from outside with SIGSTOP) makes its peers' collectives time out. So an
error that is only about a peer (a timeout, a closed connection) is traced to the rank
that went silent, with its last heartbeat and its Python stack (faulthandler, on SIGUSR1).
"""

from __future__ import annotations

import ctypes
import faulthandler
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, Callable, Iterator

from .dist import check_port_free, find_free_port
from .events import Event

STOP_GRACE_S = 5.0
BLAME_GRACE_S = 2.0   # healthy ranks that wait for the same silent peer time out within this of each other
STACK_WAIT_S = 3.0
ABOUT_A_PEER = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "peer")
TAIL_LINES = 20
BOOTSTRAPPING = "bootstrapping phase"  # in multiprocessing's error for a process started while spawn imports main
MAIN_GUARD_FIX = ("the process could not start: spawn runs the main script again in every worker, and at its top "
                  "level the script starts workers again (multiprocessing's bootstrapping error below). Fix: put the "
                  "call that starts the run under `if __name__ == \"__main__\":` in the script")


class WorkerError(RuntimeError):
    """A worker process failed; every worker has been stopped (under torchrun, by torchrun:
    ``pids`` is then empty, the ranks may live on other machines)."""

    def __init__(self, rank: int, reason: str, pids: list[int], details: str = ""):
        self.rank, self.reason, self.pids, self.details = rank, reason, pids, details
        self.detected_at = time.time()
        self.fault: dict | None = None  # set by launch when the failure was an injected fault
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


# --- inside a worker ---------------------------------------------------------------------------

def exit_now(code: int) -> None:
    """End a worker whose work is done and delivered, skipping interpreter teardown (during
    which C++ threads of the communication library may still be alive)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _worker_entry(rank: int, world_size: int, job: Callable, args: tuple, init_method: str, workdir: str,
                  pipe: Any) -> None:
    """A rank's first code of ours; its output already goes to its log (see ``output_to``)."""
    try:  # die with the parent (a killed notebook kernel): PR_SET_PDEATHSIG
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    faulthandler.enable()  # a fatal signal leaves every thread's Python stack in the log
    stack_file = open(os.path.join(workdir, f"stack{rank}.txt"), "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)  # the parent asks for a stack

    def emit(kind: str, payload: Any) -> None:
        pipe.send((kind, payload))  # written synchronously: nothing is lost at exit

    emit("started", {"pid": os.getpid()})
    try:
        job(rank, world_size, init_method, emit, *args)
    except BaseException as exc:
        traceback.print_exc()
        emit("error", {"headline": headline(exc), "traceback": traceback.format_exc(),
                       "rank_at_fault": getattr(exc, "rank_at_fault", None)})  # an error that knows whose it is
        exit_now(1)
    exit_now(0)


# --- in the parent ------------------------------------------------------------------------------

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


def run_workers(job: Callable, world_size: int, args: tuple = (), *, master_addr: str = "127.0.0.1",
                master_port: int = 0, launch_timeout_s: float = 600.0, quiet: bool = True,
                on_event: Callable[[Event], None] | None = None) -> dict[int, Any]:
    """Spawn ``world_size`` processes running ``job(rank, world_size, init_method, emit, *args)``
    (a module-level function: spawn imports it by name) and return the ``result`` payloads by rank.

    ``on_event`` sees every event as it arrives. A failure, a run longer than
    ``launch_timeout_s`` or a Ctrl-C stops every worker before this raises. ``quiet=False``
    shows the workers' output on this process's stderr too.
    """
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
        self.workdir, self.quiet = workdir, quiet
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]  # (parent's reading end, worker's writing end)
        self.readers = {reader: rank for rank, (reader, _) in enumerate(pipes)}
        self.writers = [writer for _, writer in pipes]
        self.procs = [ctx.Process(target=_worker_entry, name=f"ddp-rank{rank}",  # not daemonic: may start loaders
                                  args=(rank, world_size, job, args, init_method, str(workdir), writer))
                      for rank, writer in enumerate(self.writers)]
        self.on_event = on_event
        self.results: dict[int, Any] = {}
        self.errors: dict[int, dict] = {}
        self.heard: dict[int, dict] = {}  # rank -> its last progress payload
        self.started: set[int] = set()  # ranks that sent "started": our code runs in them
        self.shown = [0] * world_size  # quiet=False: bytes of each log already copied to stderr

    def log(self, rank: int) -> Path:
        return self.workdir / f"rank{rank}.log"

    def start(self) -> None:
        """Start every rank with its log as its stdout and stderr from its first instruction."""
        resource_tracker.ensure_running()  # else the first start launches it, and it would inherit rank 0's log
        for rank, p in enumerate(self.procs):
            with output_to(self.log(rank)):
                p.start()
        for writer in self.writers:
            writer.close()  # the workers hold the writing ends: a dead worker's pipe reads as closed

    def show_output(self, final: bool = False) -> None:
        """quiet=False: copy what the ranks wrote since the last call to this process's stderr; whole
        lines only until the end, so that two ranks' lines do not mix."""
        if self.quiet:
            return
        for rank in range(len(self.procs)):
            if not self.log(rank).exists():  # that rank was never started
                continue
            with open(self.log(rank), "rb") as fh:
                fh.seek(self.shown[rank])
                new = fh.read()
            new = new if final else new[:new.rfind(b"\n") + 1]
            self.shown[rank] += len(new)
            sys.stderr.write(new.decode(errors="replace"))
        sys.stderr.flush()

    def receive(self, reader) -> None:
        """Every message waiting in one rank's pipe; a pipe whose writer died is closed."""
        rank = self.readers[reader]
        try:
            while reader.poll():
                kind, payload = reader.recv()
                self.dispatch(Event(rank, kind, payload))
        except (EOFError, OSError):  # the rank ended (perhaps in the middle of a message)
            del self.readers[reader]
            reader.close()

    def dispatch(self, event: Event) -> None:
        if event.kind == "started":
            self.started.add(event.rank)
        elif event.kind == "result":
            self.results[event.rank] = event.payload
        elif event.kind == "error":
            self.errors[event.rank] = event.payload
        elif event.kind == "progress":
            self.heard[event.rank] = event.payload
        if self.on_event is not None:
            self.on_event(event)

    def drain(self, timeout: float = 0.0) -> None:
        for reader in mp.connection.wait(list(self.readers), timeout=timeout):
            self.receive(reader)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait(self, launch_timeout_s: float) -> dict[int, Any]:
        try:
            self.start()
            waiting = {p.sentinel: rank for rank, p in enumerate(self.procs)}
            deadline = time.monotonic() + launch_timeout_s
            while waiting:
                self.show_output()
                for ready in mp.connection.wait([*waiting, *self.readers], timeout=1.0):
                    if ready in self.readers:
                        self.receive(ready)
                    if ready not in waiting:  # a pipe (or one closed by an earlier drain in this loop)
                        continue
                    rank = waiting.pop(ready)
                    self.procs[rank].join()
                    self.drain()  # what it sent before it ended
                    if self.procs[rank].exitcode != 0:
                        raise self.failure(rank)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the run took longer than launch_timeout_s={launch_timeout_s:g} s; "
                                       f"all {len(self.procs)} workers were stopped")
            self.drain()
            return self.results
        finally:
            stop(self.procs)
            for connection in [*self.readers, *self.writers]:  # closing twice is harmless
                connection.close()
            self.show_output(final=True)

    # --- who is to blame ---------------------------------------------------------------------

    def _failed(self) -> dict[int, int]:
        return {rank: p.exitcode for rank, p in enumerate(self.procs) if p.exitcode not in (None, 0)}

    def _about_a_peer(self, rank: int) -> bool:
        """Whether a failed rank's error is only about a peer (it waited, or lost the connection).
        NCCL's watchdog ends a rank whose collective timed out with SIGABRT and no Python error."""
        error = self.errors.get(rank)
        if error is not None:
            if error.get("rank_at_fault") is not None:
                return error["rank_at_fault"] != rank
            return any(word in error["headline"].lower() for word in ABOUT_A_PEER)
        return self.procs[rank].exitcode == -signal.SIGABRT and \
            any(word in self.output(rank).lower() for word in ("watchdog", "timeout", "timed out"))

    def _own_failures(self) -> list[int]:
        return [rank for rank in sorted(self._failed()) if not self._about_a_peer(rank)]

    def failure(self, first: int) -> WorkerError:
        """The error for a run in which rank ``first`` was the first seen to fail."""
        deadline = time.monotonic() + BLAME_GRACE_S
        while not self._own_failures() and time.monotonic() < deadline and any(p.is_alive() for p in self.procs):
            self.drain(timeout=0.1)  # let the other ranks fail too: one that failed by itself may just be late
        own = self._own_failures()
        if own:  # a rank that failed by itself (an exception, an exit, a signal) comes first
            return self._own_failure(own[0])
        silent = [rank for rank, p in enumerate(self.procs) if p.is_alive() and rank not in self.errors]
        if not silent:
            return self._own_failure(first)
        culprit = min(silent, key=lambda rank: self.heard.get(rank, {}).get("time", 0.0))
        return WorkerError(culprit, stopped_making_progress(self.heard.get(culprit), first),
                           self.pids, f"rank {first}: {self.errors[first]['headline']}\n\n"
                                      f"Python stack of rank {culprit} when it was stopped:\n{self._stack(culprit)}")

    def _own_failure(self, rank: int) -> WorkerError:
        if rank in self.errors:
            return WorkerError(rank, self.errors[rank]["headline"], self.pids, self.errors[rank]["traceback"].rstrip())
        code = self.procs[rank].exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        output = self.output(rank)
        tail = "\n".join(output.splitlines()[-TAIL_LINES:])
        if rank in self.started:
            return WorkerError(rank, f"the process {how} without a Python exception", self.pids, tail)
        if BOOTSTRAPPING in output:
            return WorkerError(rank, MAIN_GUARD_FIX, self.pids, tail)
        return WorkerError(rank, f"the process {how} while starting, before the job ran (its output below)",
                           self.pids, tail or "(it wrote nothing)")

    def output(self, rank: int) -> str:
        """All that a rank wrote to its stdout and stderr."""
        return self.log(rank).read_text(errors="replace") if self.log(rank).exists() else ""

    def _stack(self, rank: int) -> str:
        """Every thread's Python stack of a live rank (it may be frozen: SIGCONT lets the handler run)."""
        pid, path = self.procs[rank].pid, self.workdir / f"stack{rank}.txt"
        try:
            os.kill(pid, signal.SIGUSR1)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return "(the process is gone)"
        deadline = time.monotonic() + STACK_WAIT_S
        while time.monotonic() < deadline and not (path.exists() and path.stat().st_size):
            time.sleep(0.05)
        time.sleep(0.1)  # let the handler finish writing
        return path.read_text(errors="replace").rstrip() if path.exists() else "(no stack was written)"


def stop(procs: list) -> None:
    """SIGTERM every live worker (SIGCONT too: a frozen one would not act on it), then SIGKILL
    what is left after a grace period; reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        if p.pid is None:
            continue
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(STOP_GRACE_S)
