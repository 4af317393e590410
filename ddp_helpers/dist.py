"""Process-group plumbing: backend and device choice, ports, threads, setup and teardown."""

from __future__ import annotations

import os
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from .config import TrainConfig


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_for(cfg: TrainConfig, world_size: int | None = None) -> int:
    """Intra-op threads per rank: the configured number, else cores // world size (at least 1).

    Two ranks with two threads each on two cores thrash: each rank gets its share.
    """
    return cfg.threads_per_rank or max(1, usable_cores() // (world_size or cfg.world_size))


def pick_backend(cfg: TrainConfig, world_size: int | None = None) -> str:
    """'nccl' when asked for, or on auto when CUDA has a device per worker; else 'gloo'."""
    if cfg.backend != "auto":
        return cfg.backend
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if gpus >= (world_size or cfg.world_size) and dist.is_nccl_available() else "gloo"


def pick_device(cfg: TrainConfig, backend: str, local_rank: int) -> torch.device:
    auto_cuda = backend == "nccl" or (backend == "none" and torch.cuda.is_available())
    if cfg.device == "cuda" or (cfg.device == "auto" and auto_cuda):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


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


def oversubscription_warning(world_size: int) -> str | None:
    cores = usable_cores()
    if world_size > cores:
        return (f"world_size={world_size} is larger than the {cores} usable CPU core(s): the ranks share "
                f"cores (oversubscribed), so timings measure contention, not scaling.")
    return None


@dataclass
class RankContext:
    """Who this process is in the run, and how to sum a tensor over all ranks."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # 'none' for the single-process baseline
    device: torch.device
    threads: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (identity in a single process)."""
        if self.world_size == 1:
            return sums
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return sums


def torchrun_store(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """The rendezvous store of a torchrun worker, with keys private to this restart attempt.

    torchrun's agent keeps one store across elastic restarts; without a per-attempt prefix
    a restarted rank can read the address its peer had in the attempt that crashed, and
    gloo's connect then fails with "Connection refused" (seen here, intermittently).
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(addr, port, world_size, is_master=rank == 0 and not agent_hosts_it,
                          timeout=timedelta(seconds=timeout_s))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"ddp_helpers/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/attempt_{attempt}", store)


def tcp_store(init_method: str, rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """The rendezvous store behind ``tcp://host:port`` (hosted by rank 0), as
    ``init_process_group(init_method=...)`` would build it, but kept in our hands so that
    the ranks can also use it to leave together."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"init_method must look like tcp://HOST:PORT, got {init_method!r}")
    return dist.TCPStore(url.hostname, url.port, world_size, is_master=rank == 0,
                         timeout=timedelta(seconds=timeout_s))


def leave_together(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> None:
    """Return only when every rank has finished its last collective.

    A rank that tears down its gloo connections while a peer is still inside a collective
    can make that peer abort (``terminate called without an active exception``: seen at
    exit, rarely, in CI). A gloo barrier would only move the problem to the barrier, so the
    ranks meet in the rendezvous store instead. Rank 0 leaves last: it may host the store.
    """
    timeout = timedelta(seconds=timeout_s)
    store.set(f"exit/finished/{rank}", "1")
    store.wait([f"exit/finished/{r}" for r in range(world_size)], timeout)
    if rank == 0:
        store.wait([f"exit/left/{r}" for r in range(1, world_size)], timeout)
    else:
        store.set(f"exit/left/{rank}", "1")


@contextmanager
def process_group(cfg: TrainConfig, rank: int, world_size: int, local_rank: int,
                  init_method: str | None = None, store: dist.Store | None = None) -> Iterator[RankContext]:
    """Join the process group (with a timeout), yield the context, always leave it.

    Rendezvous through ``init_method`` (tcp:// for spawned workers) or an existing ``store``.
    After a body that succeeded, the ranks leave together (:func:`leave_together`); after
    one that raised, at once: the others may be gone.
    """
    backend = pick_backend(cfg, world_size)
    device = pick_device(cfg, backend, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = threads_for(cfg, world_size)
    torch.set_num_threads(threads)
    if store is None:
        store = tcp_store(init_method, rank, world_size, cfg.timeout_s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gloo's note about the absent device_id is not actionable here
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=cfg.timeout_s),
                                store=store)
    try:
        yield RankContext(rank, world_size, local_rank, backend, device, threads)
        leave_together(store, rank, world_size, cfg.timeout_s)
    finally:
        dist.destroy_process_group()


@contextmanager
def single_process(cfg: TrainConfig) -> Iterator[RankContext]:
    """The baseline's context: no process group; threads set for the run and restored after."""
    previous = torch.get_num_threads()
    threads = threads_for(cfg, 1)
    torch.set_num_threads(threads)
    device = pick_device(cfg, "none", 0)
    try:
        yield RankContext(0, 1, 0, "none", device, threads)
    finally:
        torch.set_num_threads(previous)
