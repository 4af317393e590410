"""An all-reduce through shared memory, for the ranks of one node.

gloo moves a tensor between two processes of one machine over TCP loopback: through the kernel's
socket buffers, in packets, well under memory speed. Ranks that share a machine can share memory
instead. Here they share one segment with a slot per rank and a slot for the sums, and an
all-reduce is three passes over the tensor, split as a reduce-scatter and an all-gather:

1. *in*: each rank copies its tensor into its own slot;
2. *reduce-scatter*: each rank sums its share of the elements over every slot, in rank order, into
   the sums (so every element is added in the same order whichever rank adds it: each rank ends
   with bitwise the same tensor, and with two ranks the same as gloo's, since a + b == b + a);
3. *all-gather*: each rank copies all the sums out into its tensor.

Between the passes the ranks wait for each other. The signal that a rank's data is in place is
one byte sent over a Unix socket to each peer: the kernel's lock on the socket orders the sender's
writes to the segment before the byte, and the receiver's reads after it, on any CPU (plain stores
to a flag would rely on x86's memory ordering). A waiting rank spins briefly on non-blocking reads,
then sleeps in the kernel (poll) until the byte comes, the peer's end closes (its process ended:
reported at once) or the timeout passes (reported as gloo reports its own: a ``DistBackendError``).

A rank may also keep its tensors in the segment itself (:meth:`NodeGroup.buffers`: the from-scratch
DDP keeps its gradient buckets there, so autograd writes the gradients straight into shared
memory). Such a tensor is all-reduced without a copy in or out: each rank sums its share of the
element range over every rank's buffer and writes the sums into all of them, two passes in all.

Nothing is left behind: the segment is an anonymous memfd (never in /dev/shm), passed from the
node's first rank to the others over those sockets, whose addresses are abstract (no file); both
vanish with the last process that holds them, however it ends.
"""

from __future__ import annotations

import mmap
import os
import secrets
import select
import socket
import struct
import time

import torch
import torch.distributed as dist

SPIN_S = 300e-6  # a peer that is about to arrive is waited for on the CPU, one that is late in the kernel


class NodeGroup:
    """The ranks of one node, joined through one shared segment. ``node_ranks``: their global ranks,
    in order (this rank among them); ``store``: the job's store, where each publishes its address.
    The segment is made at the first all-reduce, sized for ``capacity_bytes`` or that tensor if
    larger; larger tensors later go through it in pieces."""

    def __init__(self, store: dist.Store, rank: int, node_ranks: list[int], timeout_s: float,
                 capacity_bytes: int = 0, spin_s: float = SPIN_S, label: str = "ddp_helpers"):
        self.store, self.rank, self.ranks, self.timeout_s = store, rank, list(node_ranks), timeout_s
        self.index, self.size = self.ranks.index(rank), len(self.ranks)
        self.capacity, self.spin_s, self.label = capacity_bytes, spin_s, label
        self.peers: dict[int, socket.socket] = {}  # index on this node -> the connection to it
        self.segment: mmap.mmap | None = None
        self.home = 0  # bytes of each rank's own buffers at the start of the segment (see buffers)
        self.views: dict[torch.dtype, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self.homes: dict[torch.dtype, list[torch.Tensor]] = {}

    # --- joining -----------------------------------------------------------------------------
    def _join(self, nbytes: int) -> None:
        """Connect to every peer of the node and map the segment (every rank calls this at its first
        all-reduce, with the same tensor size)."""
        deadline = time.monotonic() + self.timeout_s
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            address = f"\0{self.label}/{self.rank}/{os.getpid()}/{secrets.token_hex(8)}"  # abstract: no file
            listener.bind(address)
            listener.listen(self.size)
            self.store.set(f"shm/address/{self.rank}", address)
            for index in range(self.index):  # connect to every lower index, accept every higher one
                peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                peer.settimeout(self._left(deadline))
                peer.connect(self.store.get(f"shm/address/{self.ranks[index]}").decode())
                peer.sendall(struct.pack("!I", self.index))
                self.peers[index] = peer
            for _ in range(self.index + 1, self.size):
                listener.settimeout(self._left(deadline))
                peer, _ = listener.accept()
                peer.settimeout(self._left(deadline))
                self.peers[struct.unpack("!I", _read_exactly(peer, 4))[0]] = peer
        except (OSError, RuntimeError) as exc:
            raise dist.DistBackendError(f"shared-memory all-reduce: rank {self.rank} could not reach the other ranks "
                                        f"of its node {self.ranks} within {self.timeout_s:g} s ({exc})") from None
        finally:
            listener.close()
        self.capacity = max(self.capacity, nbytes)
        size = self.size * self.home + (self.size + 1) * self.capacity  # own buffers; a slot per rank; the sums
        if self.index == 0:
            fd = os.memfd_create(f"{self.label}-{os.getpid()}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            for peer in self.peers.values():
                socket.send_fds(peer, [struct.pack("!Q", size)], [fd])
        else:
            data, fds, _, _ = socket.recv_fds(self.peers[0], 8, 1)
            fd = fds[0]
            if struct.unpack("!Q", data)[0] != size:
                raise dist.DistBackendError(f"shared-memory all-reduce: rank {self.rank}'s first tensor differs in "
                                            f"size from local rank 0's; every rank must reduce the same tensors")
        try:
            self.segment = mmap.mmap(fd, size)
        finally:
            os.close(fd)  # the mapping keeps the segment; no name refers to it
        for peer in self.peers.values():
            peer.setblocking(False)

    def _left(self, deadline: float) -> float:
        return max(0.001, deadline - time.monotonic())

    def _slots(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The slots and the sums, as flat tensors of ``dtype`` over the segment."""
        if dtype not in self.views:
            count, start = self.capacity // _itemsize(dtype), self.size * self.home
            parts = [torch.frombuffer(self.segment, dtype=dtype, count=count, offset=start + i * self.capacity)
                     for i in range(self.size + 1)]
            self.views[dtype] = parts[:-1], parts[-1]
        return self.views[dtype]

    def _homes(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every rank's own buffers, as flat tensors of ``dtype``."""
        if dtype not in self.homes:
            self.homes[dtype] = [torch.frombuffer(self.segment, dtype=dtype, count=self.home // _itemsize(dtype),
                                                  offset=i * self.home) for i in range(self.size)]
        return self.homes[dtype]

    def buffers(self, shapes: list[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
        """Zeroed tensors of these sizes in this rank's own part of the segment, for tensors that are
        all-reduced again and again (gradient buckets): without a copy in or out. Every rank of the
        node asks for the same, once, before its first all-reduce (it makes the segment)."""
        if self.segment is not None:
            raise RuntimeError("NodeGroup.buffers: ask for the buffers before the first all-reduce")
        offsets, end = [], 0
        for numel, dtype in shapes:
            offsets.append(end)
            end += -(-numel * _itemsize(dtype) // 64) * 64  # each starts on a cache line
        self.home = end
        self._join(self.capacity or 2**16)
        return [torch.frombuffer(self.segment, dtype=dtype, count=numel, offset=self.index * self.home + offset)
                for (numel, dtype), offset in zip(shapes, offsets)]

    def _in_home(self, flat: torch.Tensor) -> int | None:
        """The byte offset of ``flat`` in this rank's own buffers, or None when it lies elsewhere."""
        if not self.home:
            return None
        home = self._homes(flat.dtype)[self.index]
        offset = flat.data_ptr() - home.data_ptr()
        return offset if 0 <= offset and offset + flat.numel() * flat.element_size() <= self.home else None

    # --- the collective ------------------------------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor, divide_by: int = 1) -> torch.Tensor:
        """Sum ``tensor`` over the node's ranks, in place; every rank ends with bitwise the same values.
        ``divide_by``: each rank's values are divided by it first, as DDP averages (in the copy in)."""
        if self.size == 1:
            return tensor.div_(divide_by) if divide_by != 1 else tensor
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        if self.segment is None:
            self._join(flat.numel() * flat.element_size())
        offset = self._in_home(flat)
        if offset is not None:
            self._reduce_in_place(flat, offset, divide_by)
            return tensor
        slots, sums = self._slots(flat.dtype)
        piece = slots[0].numel()
        for start in range(0, flat.numel(), piece):
            part = flat[start:start + piece]
            n = part.numel()
            torch.div(part, divide_by, out=slots[self.index][:n])  # 1. in (and averaged, as DDP does)
            self.barrier()
            lo, hi = n * self.index // self.size, n * (self.index + 1) // self.size
            torch.add(slots[0][lo:hi], slots[1][lo:hi], out=sums[lo:hi])  # 2. my share, in rank order
            for slot in slots[2:]:
                sums[lo:hi].add_(slot[lo:hi])
            self.barrier()
            part.copy_(sums[:n])                                   # 3. out
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view_as(tensor))
        return tensor

    def _reduce_in_place(self, flat: torch.Tensor, offset: int, divide_by: int) -> None:
        """A tensor in the ranks' own buffers: each rank sums its share over every rank's buffer, in
        rank order, and writes the sums into all of them."""
        first, n = offset // flat.element_size(), flat.numel()
        lo, hi = first + n * self.index // self.size, first + n * (self.index + 1) // self.size
        shares = [home[lo:hi] for home in self._homes(flat.dtype)]
        self.barrier()  # every rank's tensor is complete
        total = shares[0].div_(divide_by) if divide_by != 1 else shares[0]
        for share in shares[1:]:
            total.add_(share / divide_by if divide_by != 1 else share)
        for share in shares[1:]:
            share.copy_(total)
        self.barrier()  # every share is summed, in every rank's buffer

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The node's first rank's ``tensor`` on every rank of the node (after a reduce across nodes)."""
        if self.size == 1:
            return tensor
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        if self.segment is None:
            self._join(flat.numel() * flat.element_size())
        _, sums = self._slots(flat.dtype)
        piece = sums.numel()
        for start in range(0, flat.numel(), piece):
            part = flat[start:start + piece]
            self.barrier()  # everyone is done with the sums of the last collective
            if self.index == 0:
                sums[:part.numel()].copy_(part)
            self.barrier()
            if self.index != 0:
                part.copy_(sums[:part.numel()])
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view_as(tensor))
        return tensor

    def barrier(self) -> None:
        """Tell every peer that this rank got here, and wait until each has told this rank the same."""
        for peer in self.peers.values():
            try:
                peer.send(b"\1")
            except BlockingIOError:  # a peer that stopped reading for long: its buffer is full
                self._wait_writable(peer)
                peer.send(b"\1")
            except OSError:
                raise self._gone(peer) from None
        waiting = dict(self.peers)
        spin_until, deadline = time.perf_counter() + self.spin_s, time.monotonic() + self.timeout_s
        while waiting:
            for index, peer in list(waiting.items()):
                try:
                    got = peer.recv(1)
                except BlockingIOError:
                    continue
                except OSError:
                    got = b""
                if not got:
                    raise self._gone(peer)
                del waiting[index]
            if waiting and time.perf_counter() > spin_until:  # sleep in the kernel until a peer writes
                left = deadline - time.monotonic()
                if left <= 0:
                    late = sorted(self.ranks[i] for i in waiting)
                    raise dist.DistBackendError(
                        f"shared-memory all-reduce: rank {self.rank} timed out after {self.timeout_s:g} s waiting for "
                        f"rank(s) {late} of its node")
                select.select(list(waiting.values()), [], [], min(left, 1.0))

    def _wait_writable(self, peer: socket.socket) -> None:
        if not select.select([], [peer], [], self.timeout_s)[1]:
            raise dist.DistBackendError(f"shared-memory all-reduce: rank {self.rank} timed out after "
                                        f"{self.timeout_s:g} s: a peer of its node stopped reading")

    def _gone(self, peer: socket.socket) -> dist.DistBackendError:
        index = next(i for i, p in self.peers.items() if p is peer)
        return dist.DistBackendError(f"shared-memory all-reduce: rank {self.ranks[index]} of this node closed its "
                                     f"connection (its process ended); rank {self.rank} stopped waiting for it")

    def close(self) -> None:
        self.views.clear()  # the tensors over the segment go first: a mapping with views cannot close
        self.homes.clear()
        if self.segment is not None:
            try:
                self.segment.close()
            except BufferError:  # a caller still holds a view: the mapping goes with the process
                pass
            self.segment = None
        for peer in self.peers.values():
            peer.close()
        self.peers.clear()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("the peer closed the connection while joining")
        data += chunk
    return data
