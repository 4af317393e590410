"""How a rank's all-reduces travel: through gloo (TCP, loopback within a machine), or through shared
memory among the ranks of a node (:mod:`ddp_helpers.shm`), with one leader per node over gloo
between nodes. The strategies that all-reduce themselves (DDP's plain hook, the manual all-reduce,
local SGD) take the transport; torch's fp16 and PowerSGD hooks call ``dist.all_reduce`` and stay on
gloo. Which ranks share a node comes from the launcher (``place.node``), never from the host name
or /dev/shm: the network lab's "nodes" are namespaces of one machine and share both.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.distributed as dist

from .host import usable_cores
from .shm import SPIN_S, NodeGroup


def name_of(described: str) -> str:
    """The transport's name ("gloo", "shm") from the description a record keeps (``describe()``)."""
    return described.split(" (")[0]


class Gloo:
    """All-reduces through the process group's backend."""

    name = "gloo"

    def describe(self) -> str:
        return "gloo"

    def buffers(self, shapes: list[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
        """Zeroed tensors for data that is all-reduced again and again (here: ordinary ones)."""
        return [torch.zeros(numel, dtype=dtype) for numel, dtype in shapes]

    def all_reduce_(self, tensor: torch.Tensor, divide_by: int = 1) -> torch.Tensor:
        """The sum over the ranks, in place; each rank's values divided by ``divide_by`` first."""
        if divide_by != 1:
            tensor.div_(divide_by)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor, divide_by: int = 1) -> "Pending":
        """A handle whose ``wait()`` returns when the sum is in ``tensor``."""
        if divide_by != 1:
            tensor.div_(divide_by)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
        pending = Pending(work.wait)
        work.get_future().then(lambda _: pending.finish())
        return pending

    def close(self) -> None:
        pass


class SharedMemory:
    """Sums within each node through shared memory; where there are several nodes, the node's first
    rank (its leader) all-reduces the node's sum with the other leaders over gloo, then shares the
    result within its node. Never shared memory in the leaders' group: they are on different nodes."""

    name = "shm"

    def __init__(self, store: dist.Store, rank: int, node_of: list[int], timeout_s: float,
                 label: str = "ddp_helpers"):
        world = len(node_of)
        self.node_ranks = [r for r in range(world) if node_of[r] == node_of[rank]]
        self.nodes = len(set(node_of))
        leaders = sorted(min(r for r in range(world) if node_of[r] == n) for n in set(node_of))
        # every rank takes part in making the leaders' group (a collective of the whole job)
        self.leaders = dist.new_group(leaders, backend="gloo") if self.nodes > 1 else None
        self.is_leader = rank == self.node_ranks[0]
        spin = SPIN_S if len(self.node_ranks) <= usable_cores() else 0.0  # oversubscribed: give the core away
        self.node = NodeGroup(dist.PrefixStore("shm", store), rank, self.node_ranks, timeout_s, spin_s=spin,
                              label=label)
        self.thread: ThreadPoolExecutor | None = None  # asynchronous all-reduces run here, in order

    def describe(self) -> str:
        within = f"shared memory among the {len(self.node_ranks)} ranks of each node"
        return f"shm ({within}; gloo between the {self.nodes} nodes' leaders)" if self.nodes > 1 else \
            f"shm ({within})"

    def buffers(self, shapes: list[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
        """Tensors in this rank's own part of the node's segment: all-reduced within the node
        without a copy in or out (ask before the first all-reduce)."""
        return self.node.buffers(shapes)

    def all_reduce_(self, tensor: torch.Tensor, divide_by: int = 1) -> torch.Tensor:
        """The sum over the ranks, in place; each rank's values divided by ``divide_by`` first."""
        self.node.all_reduce_(tensor, divide_by)
        if self.leaders is not None:
            if self.is_leader:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.leaders)
            self.node.broadcast_(tensor)
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor, divide_by: int = 1) -> "Pending":
        """A handle whose ``wait()`` returns when the sum is in ``tensor``. A thread of its own does the
        copies: with one vCPU per rank it time-slices with the computation rather than overlapping it."""
        if self.thread is None:
            self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shm-all-reduce")
        pending = Pending(lambda: future.result())
        future = self.thread.submit(lambda: pending.finish(self.all_reduce_(tensor, divide_by)))
        return pending

    def close(self) -> None:
        if self.thread is not None:
            self.thread.shutdown(wait=True)
        self.node.close()


class Pending:
    """An all-reduce under way: ``wait()`` returns once it has finished (and re-raises its error);
    ``finished_at`` is when it did (``time.perf_counter``), for a timeline."""

    def __init__(self, wait: Callable[[], object]):
        self.wait, self.finished_at = wait, None

    def finish(self, value=None):
        self.finished_at = time.perf_counter()
        return value


def open_transport(requested: str, store: dist.Store, rank: int, node_of: list[int], backend: str,
                   device: torch.device, timeout_s: float, label: str = "ddp_helpers") -> Gloo | SharedMemory:
    """The transport a run asked for: 'auto' is shared memory when a node has several ranks and the
    tensors are on the CPU, else gloo; NCCL moves GPU tensors itself (``node_of``: each rank's node;
    ``label``: names the segment and the sockets, with the job and the attempt)."""
    several = len(node_of) > len(set(node_of))
    if requested == "gloo" or backend != "gloo" or (requested == "auto" and (not several or device.type != "cpu")):
        return Gloo()
    return SharedMemory(store, rank, node_of, timeout_s, label)
