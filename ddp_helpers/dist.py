"""The process group, from plain values: rank, world size, backend, device, threads, timeout.

The idea is nanoGPT's ``ddp_setup``::

    store = dist.TCPStore(host, port, world_size, is_master=rank == 0)
    dist.init_process_group(backend, rank=rank, world_size=world_size, store=store, timeout=...)
    ...train...
    dist.destroy_process_group()

The rest makes it safe: every wait has a timeout, NCCL is told its device, the ranks leave
together, and backend, device and threads are chosen from what *this node* has (so that a
multi-node torchrun or srun job gets them right too).
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from .host import usable_cores


# --- choices made from this node's resources ------------------------------------------------
def threads_for(requested: int, local_ranks: int) -> tuple[int, str]:
    """Intra-op threads per rank, and the rule that gave them: the request, else $OMP_NUM_THREADS, else this
    node's cores shared out among its ranks (two ranks with two threads each on two cores thrash)."""
    if requested:
        return requested, f"threads_per_rank={requested} (config)"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), f"OMP_NUM_THREADS={omp}"
    cores = usable_cores()
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
        raise ValueError(f"TrainConfig.backend='nccl' needs one CUDA device per worker on this node: {local_ranks} "
                         f"local rank(s) but {have} CUDA device(s) are visible. Use backend='gloo' (or 'auto').")
    if device == "cuda" and have == 0:
        raise ValueError("TrainConfig.device='cuda' but no CUDA device is visible; use device='cpu' or 'auto'")


def pick_device(requested: str, backend: str, local_rank: int) -> torch.device:
    """The compute device: cuda for NCCL and, on auto, for a single process ('none') on a GPU machine."""
    auto_cuda = backend == "nccl" or (backend == "none" and gpu_count() > 0)
    if requested == "cuda" or (requested == "auto" and auto_cuda):
        return torch.device("cuda", local_rank % max(1, gpu_count()))
    return torch.device("cpu")


# --- ports ------------------------------------------------------------------------------------
def find_free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free right now (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def check_port_free(addr: str, port: int) -> None:
    """Raise a clear error if an explicitly requested rendezvous port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the TCP store does: connections of a finished run in TIME_WAIT do not block it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as exc:
            raise OSError(f"rendezvous port {addr}:{port} is not available ({exc.strerror}). "
                          f"Fix: pass another --master-port, or 0 to pick a free one.") from exc


def oversubscription_warning(local_ranks: int) -> list[str]:
    """A note for the record when the ranks on this node outnumber its cores (else none)."""
    cores = usable_cores()
    if local_ranks > cores:
        return [f"{local_ranks} ranks on this node but {cores} usable CPU core(s): the ranks share cores "
                f"(oversubscribed), so timings measure contention, not scaling."]
    return []


# --- rendezvous stores -------------------------------------------------------------------------
def tcp_store(init_method: str, rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """The store behind ``tcp://host:port``, hosted by rank 0; ours, so that the ranks can leave together."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"init_method must look like tcp://HOST:PORT, got {init_method!r}")
    return dist.TCPStore(url.hostname, url.port, world_size, is_master=rank == 0,
                         timeout=timedelta(seconds=timeout_s))


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
    restart_count: int = 0  # torchrun's elastic restarts before this attempt

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
                  threads_rule: str = "", restart_count: int = 0) -> Iterator[RankContext]:
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
    try:
        yield RankContext(rank, world_size, backend, device, threads, threads_rule, restart_count)
        leave_together(store, rank, world_size, timeout_s)
    except BaseException as exc:  # stamped before this rank leaves, so before any peer can notice:
        exc.raised_at = getattr(exc, "raised_at", time.time())  # the launcher blames the earliest failure
        raise
    finally:
        dist.destroy_process_group()


@contextmanager
def single_process(device: torch.device, threads: int, threads_rule: str = "") -> Iterator[RankContext]:
    """The baseline's context: no process group; threads set for the run and restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield RankContext(0, 1, "none", device, threads, threads_rule)
    finally:
        torch.set_num_threads(previous)
