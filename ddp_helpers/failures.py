"""One failure protocol for every launcher: heartbeats and failures in the rendezvous store, and
who is to blame.

Every rank, however it was started (spawned by ``launch``, by torchrun, by srun), writes into the
store of its job: its heartbeat about twice a second, and when it fails, a record of its failure,
stamped before it leaves the process group (so before any peer can notice), naming the rank it
blames once it has looked. Whoever reads the store (a failing rank under torchrun, the spawn
parent) names the culprit with the same rule, :func:`find_culprit`: blame rests on facts (times,
silence, a process that is gone), never on the words of an error.

A rank killed outright (SIGKILL, the OOM killer) writes nothing. The spawn parent sees its exit;
under torchrun or srun a failing rank looks for itself: each rank leaves where it runs (machine,
process namespace, pid) in the store, and a peer on the same machine whose process is gone without
a record, or a finish, ended without a word.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist

from .errors import DDPError

STALE_AFTER_S = 2.0   # four heartbeats missed (a rank sends one every 0.5 s): more than a slow step
BLAME_GRACE_S = 2.0   # ranks that wait for the same silent peer time out within this of each other
STORE_READ_S = 2.0    # store reads while failing are short: the store may be gone with its host


class WorkerError(DDPError, RuntimeError):
    """A rank failed and the run was stopped. ``rank`` is the rank to blame; ``pids`` the processes
    that were stopped (empty under torchrun or srun: they stop the ranks, which may be elsewhere)."""

    def __init__(self, rank: int, reason: str, pids: list[int] | None = None, details: str = ""):
        self.rank, self.reason, self.pids, self.details = rank, reason, list(pids or []), details
        self.detected_at = time.time()
        stopped = f" All {len(self.pids)} workers were stopped." if self.pids else ""
        super().__init__(f"rank {rank} failed: {reason}.{stopped}" + (f"\n{details}" if details else ""))


class StoreLost(DDPError, RuntimeError):
    """A rank could not reach its job's store while failing: which peer is to blame is not known here."""


def headline(exc: BaseException) -> str:
    """'SomeError: first line', from the innermost error when torch wraps one in another
    ('... Got the following error when running the callback: DistBackendError: ...')."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    marker = "when running the callback: "
    return text.rsplit(marker, 1)[1] if marker in text else f"{type(exc).__name__}: {text}".rstrip(": ")


def stopped_making_progress(last: dict | None, waiter: int) -> str:
    """The reason given for a silent rank, from its last heartbeat."""
    where = (f"its last heartbeat was at step {last['step']} of epoch {last['epoch']}, "
             f"{time.time() - last['time']:.1f} s ago" if last else "it never sent a heartbeat")
    return f"stopped making progress ({where}); rank {waiter} timed out waiting for it"


def ended_without_a_word(last: dict | None, waiter: int) -> str:
    """The reason given for a rank whose process is gone without a record (killed outright)."""
    where = f" after step {last['step']} of epoch {last['epoch']}" if last else ""
    return (f"its process ended without a word{where} (killed outright: SIGKILL, the out-of-memory killer?); "
            f"rank {waiter} lost its connection to it")


def machine() -> str:
    """This machine and process namespace: where a pid names one process."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, namespace = "", 0
    return f"{socket.gethostname()}/{boot}/{namespace}"


def running(pid: int) -> bool:
    """Whether a process of this machine still runs (a zombie has ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class Facts:
    """What the store says about the ranks, and what the reader saw for itself."""

    failed: dict[int, dict] = field(default_factory=dict)   # rank -> {headline, time, culprit}
    beats: dict[int, dict] = field(default_factory=dict)    # rank -> its last heartbeat
    ended: dict[int, float] = field(default_factory=dict)   # the spawn parent: ranks that ended without a word


@dataclass
class Verdict:
    rank: int
    how: str          # "named" (by another rank's record), "failed", "silent", "ended"
    by: int | None    # the rank whose record or failure led to it


def find_culprit(facts: Facts, ranks: range) -> Verdict | None:
    """The rank to blame, by one rule for every reader:

    1. a record that names another rank (a non-finite loss names the rank whose loss it was; a rank
       that waited names the one it waited for);
    2. else the earliest failure, a record or an end without one, unless by then a live rank without
       a record had clearly stopped sending heartbeats: it made the others fail (hung, frozen), so the
       stalest such rank; a rank that never sent one while others did counts as silent.
    """
    named = sorted((rec["time"], rec["culprit"], rank) for rank, rec in facts.failed.items()
                   if rec.get("culprit") not in (None, rank))
    if named:
        return Verdict(named[0][1], "named", named[0][2])
    times = {rank: rec["time"] for rank, rec in facts.failed.items()}
    times.update({rank: at for rank, at in facts.ended.items() if rank not in times})
    if not times:
        return None
    first_at, first = min((at, rank) for rank, at in times.items())
    silent = [rank for rank in ranks if rank not in times and (
        first_at - facts.beats[rank]["time"] > STALE_AFTER_S if rank in facts.beats else bool(facts.beats))]
    if silent:
        return Verdict(min(silent, key=lambda r: facts.beats.get(r, {}).get("time", 0.0)), "silent", first)
    return Verdict(first, "failed" if first in facts.failed else "ended", first)


class Board:
    """The failure board of one attempt of a job: keys in its rendezvous store."""

    def __init__(self, store: dist.Store, world_size: int):
        self.store, self.ranks = store, range(world_size)

    def beat(self, rank: int, payload: dict) -> None:
        self.store.set(f"heartbeat/{rank}", json.dumps(payload))

    def record(self, rank: int, exc: BaseException, culprit: int | None) -> None:
        """This rank's failure, stamped when it was raised (before the rank left the process group)."""
        at = getattr(exc, "raised_at", time.time())
        self.store.set(f"failed/{rank}", json.dumps({"headline": headline(exc), "time": at, "culprit": culprit}))

    def present(self, rank: int) -> None:
        """Where this rank runs: a peer on the same machine can tell when its process is gone."""
        self.store.set(f"process/{rank}", json.dumps({"where": machine(), "pid": os.getpid()}))

    def finish(self, rank: int) -> None:
        """This rank ended its work well: its process may end without anything being wrong."""
        self.store.set(f"finished/{rank}", "1")

    def gone(self, facts: Facts) -> dict[int, float]:
        """Ranks on this machine whose process ended without a record or a finish: rank -> a time it
        was surely alive (its last heartbeat)."""
        out, here = {}, machine()
        for r in self.ranks:
            if r in facts.failed or not self.store.check([f"process/{r}"]) or self.store.check([f"finished/{r}"]):
                continue
            where = json.loads(self.store.get(f"process/{r}"))
            if where["where"] == here and not running(where["pid"]):
                out[r] = facts.beats.get(r, {}).get("time", 0.0)
        return out

    def read(self, ended: dict[int, float] | None = None) -> Facts:
        def read_all(kind: str) -> dict[int, dict]:  # check() does not block
            return {r: json.loads(self.store.get(f"{kind}/{r}")) for r in self.ranks if self.store.check([f"{kind}/{r}"])}
        return Facts(read_all("failed"), read_all("heartbeat"), dict(ended or {}))

    def blame(self, rank: int, exc: BaseException) -> Verdict | None:
        """A failing rank: record the failure, then find whom to blame. With more than two ranks the
        healthy ones go silent too while they wait for a hung one; each records its failure when its
        collective times out, and the others give them up to BLAME_GRACE_S to do so."""
        self.store.set_timeout(timedelta(seconds=STORE_READ_S))
        self.record(rank, exc, getattr(exc, "rank_at_fault", None))
        verdict = find_culprit(self.facts(), self.ranks)
        deadline = time.monotonic() + BLAME_GRACE_S
        while verdict and verdict.how == "silent" and self.silent_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
            verdict = find_culprit(self.facts(), self.ranks)
        if verdict is not None and verdict.rank != rank:
            self.record(rank, exc, verdict.rank)  # the others and the parent read whom this rank waited for
        return verdict

    def facts(self) -> Facts:
        """What a rank reads: the store, and the peers on its machine that are gone."""
        facts = self.read()
        facts.ended.update(self.gone(facts))
        return facts

    def silent_count(self) -> int:
        facts = self.read()
        return sum(1 for r in self.ranks if r not in facts.failed and r in facts.beats
                   and time.time() - facts.beats[r]["time"] > STALE_AFTER_S)


def heartbeating(board: Board, rank: int, emit: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """A rank's ``emit`` that also leaves each heartbeat (a ``progress`` event) on the board."""
    def emit_and_beat(kind: str, payload: Any) -> None:
        if kind == "progress":
            board.beat(rank, payload)
        emit(kind, payload)

    return emit_and_beat


def is_own(exc: BaseException) -> bool:
    """Raised by this rank's own checks, never by waiting for a peer: one of our errors (a non-finite
    loss, a checkpoint of another run: every rank raises those alike) or a refusal of the system's."""
    return isinstance(exc, (DDPError, OSError, ValueError)) and not isinstance(exc, WorkerError)


def raise_for_culprit(board: Board, rank: int, exc: Exception) -> None:
    """In a failing rank: record the failure; raise a WorkerError naming the rank that made this one
    fail, or return when the failure is this rank's own (the caller re-raises it). A store that is
    gone (its host ended) tells nothing: the failure stays this rank's."""
    try:
        if is_own(exc):
            board.store.set_timeout(timedelta(seconds=STORE_READ_S))
            board.record(rank, exc, getattr(exc, "rank_at_fault", rank))
            return
        verdict = board.blame(rank, exc)
    except dist.DistStoreError as lost:
        if getattr(board.store, "lost", False):  # this rank's own failure to reach the store: say so
            raise StoreLost(f"rank {rank} lost the job's store: {lost}; it had failed with {headline(exc)}. This "
                            f"node is cut off from the store's host, or that host stopped: look at the other "
                            f"nodes' output for the rank they name") from None
        return
    except Exception:
        return
    if verdict is None or verdict.rank == rank:
        return
    facts = board.facts()
    mine = f"rank {rank}: {headline(exc)}"
    if verdict.rank in facts.failed:
        raise WorkerError(verdict.rank, f"{facts.failed[verdict.rank]['headline']}; rank {rank} stopped waiting "
                                        f"for it", details=mine) from None
    if verdict.rank in facts.ended:
        raise WorkerError(verdict.rank, ended_without_a_word(facts.beats.get(verdict.rank), rank),
                          details=mine) from None
    raise WorkerError(verdict.rank, stopped_making_progress(facts.beats.get(verdict.rank), rank),
                      details=mine) from None
