"""The process group, from plain values: rank, world size, backend, device, threads, timeout.

The idea is the ``ddp_setup`` of pytorch/examples' DDP tutorial series (and of rasbt's DDP script)::

    store = dist.TCPStore(host, port, world_size, is_master=False)   # the launcher hosts it
    dist.init_process_group(backend, rank=rank, world_size=world_size, store=store, timeout=...)
    ...train...
    dist.destroy_process_group()

The rest makes it safe: every wait has a timeout, NCCL is told its device, the ranks leave
together, and backend, device and threads are chosen from what *this node* has (so that a
multi-node torchrun or srun job gets them right too).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .bounded import BoundedStore
from .errors import ConfigError, SetupError
from .host import usable_cores
from .place import RankPlace
from .transport import Gloo


# --- choices made from this node's resources ------------------------------------------------
def threads_for(requested: int, local_ranks: int, launcher: str = "") -> tuple[int, str]:
    """Intra-op threads per rank, and the rule that gave them: the request (``--threads-per-rank``),
    else $OMP_NUM_THREADS, else this node's cores shared out among its ranks (two ranks with two
    threads each on two cores thrash).

    torchrun sets OMP_NUM_THREADS=1 for its workers when it is unset and a node runs more than one of
    them; a rank cannot tell that 1 from a user's, so it is honoured, and where the node has cores to
    spare the rule says so and names the flag that uses them."""
    if requested:
        return requested, f"threads_per_rank={requested} (config)"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    cores = usable_cores()
    if omp.isdigit() and int(omp) > 0:
        spare = cores // local_ranks
        if launcher == "torchrun" and omp == "1" and spare > 1:
            return 1, (f"OMP_NUM_THREADS=1, which torchrun sets when it is unset: this node has {cores} usable cores "
                       f"for {local_ranks} ranks; --threads-per-rank {spare} (or OMP_NUM_THREADS={spare}) uses them")
        return int(omp), f"OMP_NUM_THREADS={omp}"
    return max(1, cores // local_ranks), f"{cores} usable cores // {local_ranks} rank(s) on this node"


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_backend(requested: str, local_ranks: int, device: str = "auto") -> str:
    """On 'auto': 'nccl' when this node has a GPU per local rank and the device is not the CPU, else 'gloo'."""
    if requested != "auto":
        return requested
    gpus_for_all = gpu_count() >= local_ranks and dist.is_nccl_available()
    return "nccl" if gpus_for_all and device != "cpu" else "gloo"


def check_devices(backend: str, device: str, local_ranks: int) -> None:
    """NCCL needs one GPU per rank on *this* node (a 2 x 8-GPU torchrun job has 8 local ranks, not 16)."""
    have = gpu_count()
    if backend == "nccl" and have < local_ranks:
        raise ConfigError(f"TrainConfig.backend='nccl' needs one CUDA device per worker on this node: {local_ranks} "
                         f"local rank(s) but {have} CUDA device(s) are visible. Use backend='gloo' (or 'auto').")
    if device == "cuda" and have == 0:
        raise ConfigError("TrainConfig.device='cuda' but no CUDA device is visible; use device='cpu' or 'auto'")


def pick_device(requested: str, backend: str, local_rank: int) -> torch.device:
    """The compute device: cuda for NCCL and, on auto, for a single process ('none') on a GPU machine."""
    auto_cuda = backend == "nccl" or (backend == "none" and gpu_count() > 0)
    if requested == "cuda" or (requested == "auto" and auto_cuda):
        return torch.device("cuda", local_rank % max(1, gpu_count()))
    return torch.device("cpu")


# --- the rendezvous store -------------------------------------------------------------------------
def find_free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free right now (bind to port 0 and read it back); for a launcher's
    endpoint that must be named before it is bound (torchrun's --rdzv-endpoint)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def host_store(addr: str, port: int, timeout_s: float = 300.0) -> dist.TCPStore:
    """The store of a run whose ranks this process starts, as torchrun's agent hosts one: port 0 lets
    the system pick a free port (read it back from ``.port``), so no other process can take it first."""
    try:
        return dist.TCPStore(addr, port, is_master=True, wait_for_workers=False,
                             timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as exc:
        if port and "in use" in str(exc).lower():
            raise SetupError(f"rendezvous port {addr}:{port} is not available (address already in use). "
                             f"Fix: pass another --master-port, or 0 to pick a free one.") from None
        raise


def job_store(place: RankPlace, timeout_s: float) -> dist.Store:
    """A rank's view of its job's store, with the keys of this attempt only (``place.attempt``)."""
    return dist.PrefixStore(place.store_prefix, _connect(place, timeout_s))


def attempt_store(place: RankPlace, timeout_s: float) -> tuple[dist.Store, RankPlace]:
    """Under torchrun: the job's store with the keys of this attempt, and the place with the attempt
    that every rank agreed on (:func:`agree_attempt`); elsewhere as :func:`job_store`."""
    if place.launcher != "torchrun":
        return job_store(place, timeout_s), place
    raw = _connect(place, timeout_s)
    place = place.with_attempt(agree_attempt(raw, f"ddp_helpers/{place.run_id}", place.rank, place.world_size,
                                             timeout_s))
    return dist.PrefixStore(place.store_prefix, raw), place


def _connect(place: RankPlace, timeout_s: float) -> dist.TCPStore:
    """A client of the store that the launching process hosts (torchrun's agent, or ``launch``), or,
    under srun where nobody is above the ranks, the store itself, hosted by rank 0."""
    host = place.rank == 0 and not place.agent_store
    try:
        return dist.TCPStore(place.master_addr, place.master_port, place.world_size, is_master=host,
                             timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        if host and "in use" in str(exc).lower():
            raise SetupError(f"rendezvous port {place.master_addr}:{place.master_port} is not available (address "
                             f"already in use). Fix: set MASTER_PORT to a free port.") from None
        raise


def agree_attempt(store: dist.Store, base: str, rank: int, world_size: int, timeout_s: float) -> int:
    """The number of this attempt of the job (0 for the first), the same on every rank.

    torchrun's agent keeps one store across elastic restarts, but its restart count is not shared
    between nodes: on a membership change it restarts a healthy node's workers without counting a
    restart (pytorch/pytorch issue 108158), so ranks of one attempt can hold different counts. So the
    count lives in the store: rank 0 opens a new attempt by adding one to a counter there, and tells
    each other rank its number in answer to a question that rank asked with a fresh random word (an
    answer left by an earlier attempt cannot be mistaken for it); rank 0 goes on until every rank has
    confirmed that number, so a rank that asks late is still answered."""
    if rank != 0:
        word = secrets.token_hex(8)
        store.set(f"{base}/ask/{rank}", word)
        attempt = int(store.get(f"{base}/answer/{rank}/{word}"))  # waits, up to the store's timeout
        store.set(f"{base}/confirmed/{attempt}/{rank}", "1")
        return attempt
    attempt = store.add(f"{base}/attempts", 1) - 1
    waiting, deadline = set(range(1, world_size)), time.monotonic() + timeout_s
    while waiting:
        for other in list(waiting):
            if store.check([f"{base}/confirmed/{attempt}/{other}"]):
                waiting.discard(other)
            elif store.check([f"{base}/ask/{other}"]):
                store.set(f"{base}/answer/{other}/{store.get(f'{base}/ask/{other}').decode()}", str(attempt))
        if waiting and time.monotonic() > deadline:
            raise dist.DistStoreError(f"rank 0 waited {timeout_s:g} s for rank(s) {sorted(waiting)} to join attempt "
                                      f"{attempt} of the job")
        time.sleep(0.01 if waiting else 0)
    return attempt


def oversubscription_warning(local_ranks: int) -> list[str]:
    """A note for the record when the ranks on this node outnumber its cores (else none)."""
    cores = usable_cores()
    if local_ranks > cores:
        return [f"{local_ranks} ranks on this node but {cores} usable CPU core(s): the ranks share cores "
                f"(oversubscribed), so timings measure contention, not scaling."]
    return []


# --- leaving ----------------------------------------------------------------------------------------
def leave_together(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> None:
    """Return only when every rank has finished its last collective.

    A rank that tears down its gloo connections while a peer is still inside a collective can make
    that peer abort (``terminate called without an active exception``: seen at exit, rarely, in CI).
    A gloo barrier would only move the problem there, so the ranks meet in the rendezvous store.
    Rank 0 leaves last: it may host the store.
    """
    timeout = timedelta(seconds=timeout_s)
    store.set(f"exit/finished/{rank}", "1")
    store.wait([f"exit/finished/{r}" for r in range(world_size)], timeout)
    if rank == 0:
        store.wait([f"exit/left/{r}" for r in range(1, world_size)], timeout)
    else:
        store.set(f"exit/left/{rank}", "1")


# --- the context a rank trains in ----------------------------------------------------------------
@dataclass
class RankContext:
    """Who this process is in the run, and how to sum a tensor over all ranks."""

    rank: int
    world_size: int
    backend: str  # 'none' for the single-process baseline
    device: torch.device
    threads: int
    threads_rule: str = ""
    attempt: int = 0  # 0 for a job's first attempt (an elastic restart starts another)
    transport: Any = None  # how the strategies' all-reduces travel (ddp_helpers.transport): gloo unless chosen
    store: Any = None  # the job's store, with this attempt's keys, every call bounded (None in a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, value: object) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (identity in a single process)."""
        if self.world_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return sums


@contextmanager
def process_group(rank: int, world_size: int, store: dist.Store, *, backend: str = "gloo",
                  device: torch.device = torch.device("cpu"), threads: int = 1, timeout_s: float = 120.0,
                  threads_rule: str = "", attempt: int = 0) -> Iterator[RankContext]:
    """Join the process group (every wait bounded by ``timeout_s``), yield the context, always leave:
    together after a body that succeeded (:func:`leave_together`), at once after one that raised (the
    others may be gone)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gloo's note that no device_id was given: it needs none
        dist.init_process_group(backend, rank=rank, world_size=world_size, store=store,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)  # NCCL: no guessing, no hang
    bounded = BoundedStore(store, timeout_s)  # the rank's own calls: none waits without end
    try:
        yield RankContext(rank, world_size, backend, device, threads, threads_rule, attempt, Gloo(), bounded)
        leave_together(bounded, rank, world_size, timeout_s)
    except BaseException as exc:  # stamped before this rank leaves, so before any peer can notice:
        exc.raised_at = getattr(exc, "raised_at", time.time())  # the launcher blames the earliest failure
        raise
    finally:
        dist.destroy_process_group()


def job_group(place: RankPlace, timeout_s: float, **options) -> "contextmanager[RankContext]":
    """The process group of a rank's job, from its place (a study or demonstration job's one line)."""
    return process_group(place.rank, place.world_size, job_store(place, timeout_s), timeout_s=timeout_s, **options)


@contextmanager
def single_process(device: torch.device, threads: int, threads_rule: str = "") -> Iterator[RankContext]:
    """The baseline's context: no process group; threads set for the run and restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield RankContext(0, 1, "none", device, threads, threads_rule)
    finally:
        torch.set_num_threads(previous)
