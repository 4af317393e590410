"""Spawned worker processes: start them, hear from them, stop them; the run's store and its failures.

The parent hosts the run's rendezvous store, as torchrun's agent does, and each worker is a rank
of a torchrun-style job: its variables (``place.rank_variables``) are set in the worker, which
joins that store. Each rank talks to the parent over its own pipe (no shared lock: a rank killed
mid-message blocks no other) as ``(kind, payload)``: ``started``, ``progress``, ``epoch``,
``fault``, ``result``, ``error``; its output goes to its log file (worker_logs.py). Who failed is
read from the store with the one rule every launcher uses (:mod:`ddp_helpers.failures`), plus
what only the parent can see: which processes ended, how, and the stack of a silent one.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import suppress
from multiprocessing import connection, resource_tracker
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import preemption
from .bounded import BoundedStore
from .dist import host_store, job_store
from .events import Event
from .failures import (BLAME_GRACE_S, Board, Facts, Verdict, WorkerError, find_culprit, headline, heartbeating,
                       raise_for_culprit, stopped_making_progress)
from .place import launcher_place, rank_variables
from .worker_logs import RunLogs, output_to, record_stacks

STOP_GRACE_S = 5.0
ORPHAN_CHECK_S = 0.2  # how often a rank looks whether its parent is still there
RUN_FOLDER = "ddp_run_"  # + the launching process's id: its ranks' logs and stacks
BOOTSTRAPPING = "bootstrapping phase"  # in multiprocessing's error for a process started while spawn imports main
MAIN_GUARD_FIX = ("the process could not start: spawn runs the main script again in every worker, and at its top "
                  "level the script starts workers again (multiprocessing's bootstrapping error below). Fix: put the "
                  "call that starts the run under `if __name__ == \"__main__\":` in the script")
_runs = itertools.count()

Job = Callable[..., None]  # job(place, emit, *args), at module level: spawn imports it by name


def exit_now(code: int) -> None:
    """End a worker whose work is delivered, skipping teardown (communication library threads may live on)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- tensors over the pipe ---------------------------------------------------------------------------
def state_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(data), weights_only=True)


# --- in the worker ---------------------------------------------------------------------------------------
def _worker_entry(job: Job, args: tuple, variables: dict[str, str], workdir: str, pipe: Any) -> None:
    """A rank's first code of ours; its output already goes to its log (see ``output_to``)."""
    parent = os.getppid()
    threading.Thread(target=_die_with_parent, args=(parent, workdir), daemon=True).start()
    os.environ.update(variables)  # what makes this process a rank: here only, never in the parent
    signal.signal(preemption.SIGNAL, lambda signum, frame: preemption.request())  # the scheduler's warning
    place = launcher_place()
    record_stacks(workdir, place.rank)

    def send(kind: str, payload: Any) -> None:
        pipe.send((kind, payload))  # written synchronously: nothing is lost at exit

    board = Board(BoundedStore(job_store(place, timeout_s=60), 60), place.world_size)
    emit = heartbeating(board, place.rank, send)
    emit("started", {"pid": os.getpid()})
    try:
        job(place, emit, *args)
    except BaseException as exc:
        raised_at = getattr(exc, "raised_at", time.time())  # stamped by dist.process_group, before the rank left
        traceback.print_exc()
        if isinstance(exc, Exception):
            with suppress(WorkerError):  # the parent names the culprit from the board
                raise_for_culprit(board, place.rank, exc)
        with suppress(OSError):  # the parent may be gone, with its end of the pipe
            send("error", {"headline": headline(exc), "traceback": traceback.format_exc(), "time": raised_at})
        _leave(1, parent, workdir)
    _leave(0, parent, workdir)


def _die_with_parent(parent: int, workdir: str) -> None:
    """End this rank soon after its parent ends (a killed notebook kernel, a SIGKILL), removing the
    run's folder (the parent can no longer): nothing is left behind. A thread, not PR_SET_PDEATHSIG's
    signal, so that the folder goes too; a rank inside a collective still notices (torch releases
    the interpreter's lock there)."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_S)
    _leave(1, parent, workdir)


def _leave(code: int, parent: int, workdir: str) -> None:
    """End this rank; an orphan (its parent gone) first removes the run's folder."""
    if os.getppid() != parent:
        shutil.rmtree(workdir, ignore_errors=True)
    exit_now(code)


def remove_orphaned_run_folders(folder: str | None = None) -> None:
    """Run folders whose launching process is gone (killed before its workers noticed): removed."""
    for path in Path(folder or tempfile.gettempdir()).glob(f"{RUN_FOLDER}*"):
        owner = path.name[len(RUN_FOLDER):].split("_", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(path, ignore_errors=True)


# --- in the parent ---------------------------------------------------------------------------------------
def run_workers(job: Job, world_size: int, args: tuple = (), *, master_addr: str = "127.0.0.1",
                master_port: int = 0, launch_timeout_s: float = 600.0, quiet: bool = True,
                on_event: Callable[[Event], None] | None = None) -> dict[int, Any]:
    """Spawn ``world_size`` ranks running ``job(place, emit, *args)``; return the ``result`` payloads by
    rank. ``on_event`` sees every event as it arrives; ``quiet=False`` copies the workers' output to
    stderr. A failure, a timeout or a Ctrl-C stops every worker before this raises."""
    store = host_store(master_addr, master_port)  # port 0: the system picks a free one, and it is ours
    run_id = f"spawn-{os.getpid()}-{next(_runs)}"
    variables = [rank_variables(rank, world_size, master_addr, store.port, run_id) for rank in range(world_size)]
    board = Board(dist.PrefixStore(launcher_place(variables[0]).store_prefix, store), world_size)
    try:
        # the logs and stacks live in the folder: it is removed however the run ends (also by a signal)
        remove_orphaned_run_folders()
        with tempfile.TemporaryDirectory(prefix=f"{RUN_FOLDER}{os.getpid()}_", ignore_cleanup_errors=True) as workdir:
            return _Run(job, args, variables, Path(workdir), quiet, on_event, board).wait(launch_timeout_s)
    finally:
        del board, store  # the store's server stops with its last reference


class _Run:
    """One run: the processes, what they said, and how it ended."""

    def __init__(self, job: Job, args: tuple, variables: list[dict], workdir: Path, quiet: bool,
                 on_event: Callable[[Event], None] | None, board: Board):
        world_size = len(variables)
        self.logs, self.on_event, self.board = RunLogs(workdir, world_size, quiet), on_event, board
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]  # (parent's reading end, worker's writing end)
        self.readers = {reader: rank for rank, (reader, _) in enumerate(pipes)}
        self.writers = [writer for _, writer in pipes]
        self.procs = [ctx.Process(target=_worker_entry, name=f"ddp-rank{rank}",  # not daemonic: may start loaders
                                  args=(job, args, variables[rank], str(workdir), writer))
                      for rank, writer in enumerate(self.writers)]
        self.results, self.errors = {}, {}  # by rank: its result, its error
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
                if event.kind in ("result", "error"):
                    (self.results if event.kind == "result" else self.errors)[event.rank] = event.payload
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
                preemption.StopStep.forward(self.board.store)  # a stop asked of this process goes to the ranks
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
        """The error for a run in which a rank failed, once the others had BLAME_GRACE_S to fail too
        (the rank that failed by itself may be seen to end after the peers it took down)."""
        deadline = time.monotonic() + BLAME_GRACE_S
        while len(self.ended) < len(self.procs) and time.monotonic() < deadline:
            self.drain(timeout=0.1)
        ended = {rank: at for rank, at in self.ended.items() if self.procs[rank].exitcode}
        try:
            facts = self.board.read(ended)
        except Exception:  # the store failed us: what the parent saw for itself still tells
            facts = Facts(ended=ended)
        verdict = find_culprit(facts, range(len(self.procs))) or Verdict(min(ended, key=ended.get), "ended", None)
        culprit = verdict.rank
        if culprit in self.ended or culprit in self.errors:
            return self.own_failure(culprit)
        stack = self.logs.stack(culprit, self.procs[culprit].pid)  # alive and silent: where it stopped
        by = verdict.by if verdict.by is not None else min(ended, key=ended.get)
        return WorkerError(culprit, stopped_making_progress(facts.beats.get(culprit), by), self.pids,
                           f"rank {by}: {self.what_failed(by)}\n\nPython stack of rank {culprit} when it was "
                           f"stopped:\n{stack}")

    def what_failed(self, rank: int) -> str:
        if rank in self.errors:
            return self.errors[rank]["headline"]
        code = self.procs[rank].exitcode
        if code is None:
            return "it is still running"
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"the process {how}"

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


__all__ = ["WorkerError", "run_workers", "state_bytes", "state_from_bytes", "stop"]
