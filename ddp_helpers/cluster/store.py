"""Under torchrun or srun: the rendezvous store, heartbeats and failures in it, and who is to blame.

A spawned run's parent hears every rank over its pipe (workers.py). Under torchrun or srun no
process hears them, so the ranks tell each other through the store: each writes its heartbeat
there, and its headline when it fails by itself; a rank that fails because of another names it.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from ..events import Event, Handler
from ..workers import BLAME_GRACE_S, STALE_AFTER_S, WorkerError, headline, stopped_making_progress
from .env import RankPlace

STORE_READ_S = 2.0  # store reads while failing are short: the store may be gone with its host


def torchrun_store(env: RankPlace, timeout_s: float) -> dist.Store:
    """The store of a torchrun (or srun) rank, with keys private to this restart attempt.

    torchrun's agent keeps one store across elastic restarts: without a per-attempt prefix a
    restarted rank can read the address its peer had in the attempt that crashed, and gloo's
    connect fails with "Connection refused" (seen here, intermittently). Under srun rank 0 hosts it.
    """
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                          is_master=env.rank == 0 and not agent_hosts_it, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"ddp_helpers/{env.run_id}/attempt_{env.restart_count}", store)


def store_emit(store: dist.Store, rank: int, handle: Handler) -> Callable[[str, dict], None]:
    """A torchrun rank's ``emit``: every event to the handler, each heartbeat to the store too."""
    def emit(kind: str, payload: dict) -> None:
        if kind == "progress":
            store.set(f"heartbeat/{rank}", json.dumps(payload))
        handle(Event(rank, kind, payload))

    return emit


def read_ranks(store: dist.Store, kind: str, ranks: list[int]) -> dict[int, dict]:
    """What each of these ranks wrote under ``kind/<rank>``, for those that did (check does not block)."""
    return {rank: json.loads(store.get(f"{kind}/{rank}")) for rank in ranks if store.check([f"{kind}/{rank}"])}


def peers_in_store(store: dist.Store, others: list[int]) -> tuple[dict[int, dict], dict[int, dict]]:
    """(ranks that failed by themselves, ranks whose heartbeat is clearly stale and that did not
    say they were waiting), each with what it wrote."""
    failed, waited = read_ranks(store, "failed", others), read_ranks(store, "waited", others)
    beats = read_ranks(store, "heartbeat", others)
    return failed, {r: b for r, b in beats.items() if r not in waited and time.time() - b["time"] > STALE_AFTER_S}


def culprit_in_store(store: dist.Store, rank: int, world_size: int, exc: BaseException) -> WorkerError | None:
    """The error naming the rank that made this one fail, or None when the failure is this rank's own.

    A rank that failed by itself comes first: it wrote its headline before it left the process
    group, so before its peers could notice. Else the rank whose heartbeat is clearly stale; with
    more than two ranks the healthy ones go silent too while they wait: each says that it waited,
    and the others give them up to BLAME_GRACE_S to say so.
    """
    others = [r for r in range(world_size) if r != rank]
    try:
        store.set_timeout(timedelta(seconds=STORE_READ_S))
        failed, silent = peers_in_store(store, others)
        if silent and not failed:
            store.set(f"waited/{rank}", json.dumps({"time": time.time()}))
            deadline = time.monotonic() + BLAME_GRACE_S
            while len(silent) > 1 and not failed and time.monotonic() < deadline:
                time.sleep(0.1)
                failed, silent = peers_in_store(store, others)
    except Exception:  # the store is gone (its host ended): nothing to tell
        return None
    mine = f"rank {rank}: {headline(exc)}"
    if failed:
        culprit = min(failed, key=lambda r: failed[r]["time"])
        return WorkerError(culprit, f"{failed[culprit]['headline']}; rank {rank} stopped waiting for it", [], mine)
    if silent:
        culprit = min(silent, key=lambda r: silent[r]["time"])
        return WorkerError(culprit, stopped_making_progress(silent[culprit], rank), [], mine)
    return None


def mark_failed(store: dist.Store, rank: int, exc: BaseException) -> None:
    """Tell the other ranks that this one failed by itself, and why."""
    try:
        store.set_timeout(timedelta(seconds=STORE_READ_S))
        store.set(f"failed/{rank}", json.dumps({"headline": headline(exc), "time": time.time()}))
    except Exception:  # the store is gone: the others will see only a closed connection
        pass
