"""Inside data parallelism, each lesson run on spawned gloo ranks (notebook 08): the buckets DDP
makes (notebook 01), the ring that all-reduce is made of, what one rank's memory holds, ZeRO-1's sharded optimizer state, and five
common DDP mistakes, each made and then avoided.

Every function returns plain values per rank; the notebook prints and charts them.
"""

from __future__ import annotations

import hashlib
import re
import os
import threading
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.join import Join
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

from ..data import load_datasets
from ..dist import job_group
from ..model import MLP
from ..place import RankPlace
from ..workers import run_workers

MIB = 2 ** 20
MEMORY_PARTS = ("parameters", "gradients", "Adam's two moments", "DDP's gradient bucket",  # what a rank's
                "activations kept for backward", "MNIST (both splits) as tensors")      # tensors take, counted


def _digest(model: nn.Module) -> str:
    """A short fingerprint of a model's parameters: equal digests, bit-identical parameters."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _said(exc: BaseException, limit: int = 200) -> str:
    """What an exception says, on one line, cut at ``limit`` characters."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or "(no message)"
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", text)  # where in torch's C++ sources: not ours to show
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- the ring -------------------------------------------------------------------------------------

def ring_all_reduce(tensor: torch.Tensor, rank: int, world_size: int) -> int:
    """Sum ``tensor`` over all ranks in place, the way a ring does it, from point-to-point messages:
    W-1 steps of reduce-scatter (each rank ends with one chunk summed over all), then W-1 steps of
    all-gather (each summed chunk travels round the ring). Returns the bytes this rank sent."""
    chunks = list(tensor.chunk(world_size))  # views: writing a chunk writes the tensor
    right, left, sent = (rank + 1) % world_size, (rank - 1) % world_size, 0
    for phase in ("reduce-scatter", "all-gather"):
        for step in range(world_size - 1):
            out = (rank - step + (phase == "all-gather")) % world_size
            into = (rank - step - 1 + (phase == "all-gather")) % world_size
            incoming = torch.empty_like(chunks[into])
            request = dist.isend(chunks[out].contiguous(), right)
            dist.recv(incoming, left)
            request.wait()
            sent += chunks[out].numel() * chunks[out].element_size()
            if phase == "reduce-scatter":
                chunks[into].add_(incoming)
            else:
                chunks[into].copy_(incoming)
    return sent


def _collectives_job(place: RankPlace, emit: Callable, length: int) -> None:
    with job_group(place, 60):
        rank, world = place.rank, place.world_size
        mine = torch.arange(length, dtype=torch.float64) + 100 * rank  # integers: every sum is exact
        ring = mine.clone()
        sent = ring_all_reduce(ring, rank, world)
        reference = mine.clone()
        dist.all_reduce(reference)
        gathered = [torch.empty(length // world, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(gathered, mine.chunk(world)[rank].contiguous())
        summed = torch.empty(length // world, dtype=torch.float64)  # torch's own two halves, in a row
        dist.reduce_scatter(summed, [c.contiguous() for c in mine.chunk(world)])
        both = [torch.empty_like(summed) for _ in range(world)]
        dist.all_gather(both, summed)
        emit("result", {"mine": mine.tolist(), "ring": ring.tolist(), "all_reduce": reference.tolist(),
                        "ring_equals_all_reduce": bool(torch.equal(ring, reference)), "bytes_sent": sent,
                        "all_gather": torch.cat(gathered).tolist(), "reduce_scatter": summed.tolist(),
                        "reduce_scatter_all_gather_equals_all_reduce": bool(torch.equal(torch.cat(both), reference))})


def collectives(world_size: int, length: int = 8, timeout_s: float = 120) -> dict[int, dict]:
    """Each rank holds ``100 * rank + [0, 1, ..., length-1]``: summed by our ring and by gloo's
    all-reduce (compared exactly), each rank's own chunk all-gathered, and torch's reduce-scatter
    (rank i gets chunk i summed) followed by an all-gather of those chunks, compared with the all-reduce. Per rank: the tensors and
    the bytes the ring made it send (``2 (W-1)/W`` of the tensor's)."""
    if length % world_size:
        raise ValueError(f"length {length} must be a multiple of world_size {world_size}")
    return run_workers(_collectives_job, world_size, (length,), launch_timeout_s=timeout_s)


# --- DDP's buckets -------------------------------------------------------------------------------

def _buckets_job(place: RankPlace, emit: Callable, caps: list) -> None:
    with job_group(place, 60):
        layouts = {}
        for cap in caps:
            model = DDP(MLP(), bucket_cap_mb=cap)
            seen: list[list[int]] = []

            def record(state, bucket):  # the bucket's bytes, then the default hook's work
                seen[-1].append(bucket.buffer().numel() * bucket.buffer().element_size())
                return default_hooks.allreduce_hook(state, bucket)

            model.register_comm_hook(None, record)
            for _ in range(2):  # DDP rebuilds its buckets after the first iteration, in the order grads came
                seen.append([])
                F.cross_entropy(model(torch.randn(32, 784)), torch.randint(0, 10, (32,))).backward()
            layouts[str(cap)] = seen
        emit("result", layouts)


def bucket_layout(caps=(None, 25, 1, 0.25), timeout_s: float = 120) -> dict[str, list[list[int]]]:
    """The buckets DDP really makes of the MLP's gradient for each ``bucket_cap_mb`` (None: torch's
    default): the bytes of each bucket all-reduced in the first and the second iteration."""
    return run_workers(_buckets_job, 1, (list(caps),), launch_timeout_s=timeout_s)[0]


# --- memory per rank ------------------------------------------------------------------------------

def pss_mib(pid: int | str = "self") -> float:
    """Proportional set size in MiB: resident pages, each shared page divided among the processes
    that map it (so the library pages two ranks share are counted once in their sum)."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise OSError("no Pss line in smaps_rollup")


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmRSS line")


class Sampler:
    """The highest PSS of a process, sampled every ``interval_s`` in a thread (PSS has no high-water mark)."""

    def __init__(self, pid: int | str = "self", interval_s: float = 0.01):
        self.pid, self.interval_s, self.peak, self.samples, self.span_s = pid, interval_s, 0.0, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak, self.samples = max(self.peak, pss_mib(self.pid)), self.samples + 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "Sampler":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.span_s = time.monotonic() - self._started


def saved_activation_bytes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for one batch's backward (activations, masks;
    the weights it also keeps are not counted: they are the parameters)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:  # a tensor's own bytes: the batch is a view of the data
            kept[(t.data_ptr(), t.shape, t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


def _memory_job(place: RankPlace, emit: Callable, data_dir: str, batch_size: int, steps: int,
                interval_s: float) -> None:
    stages = {"python and torch imported": (pss_mib(), rss_mib())}
    with Sampler(interval_s=interval_s) as sampler, job_group(place, 120):
        train, test = load_datasets("mnist", data_dir)
        stages["MNIST loaded (70,000 x 784 float32)"] = (pss_mib(), rss_mib())
        torch.manual_seed(0)
        model = DDP(MLP())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
        stages["model, DDP and Adam built"] = (pss_mib(), rss_mib())
        picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(place.rank))
        for step in range(steps):
            index = picks[step * batch_size:(step + 1) * batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(train.images[index]), train.labels[index]).backward()
            optimizer.step()
        stages[f"after {steps} training steps"] = (pss_mib(), rss_mib())
        parameters = sum(p.numel() * p.element_size() for p in model.parameters())
        moments = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                      for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
        activations = saved_activation_bytes(model.module, train.images[:batch_size], train.labels[:batch_size])
        dist.barrier()
    data = sum(t.nbytes for split in (train, test) for t in (split.images, split.labels))
    emit("result", {"stages": stages, "peak_pss_mib": sampler.peak, "samples": sampler.samples,
                    "span_s": sampler.span_s,
                    "bytes": dict(zip(MEMORY_PARTS, (parameters, parameters, moments, parameters, activations, data)))})


def memory_per_rank(data_dir: str = "", world_size: int = 2, batch_size: int = 32, steps: int = 50,
                    interval_s: float = 0.01, timeout_s: float = 300) -> dict:
    """A short DDP run on real MNIST: each rank's PSS and RSS at four stages and its peak PSS (sampled
    every ``interval_s``), what its tensors take by count, and the launching process's peak PSS."""
    with Sampler(os.getpid(), interval_s) as launcher:
        ranks = run_workers(_memory_job, world_size, (data_dir, batch_size, steps, interval_s),
                            launch_timeout_s=timeout_s)
    return {"ranks": ranks, "launcher_peak_pss_mib": launcher.peak, "launcher_samples": launcher.samples,
            "launcher_span_s": launcher.span_s, "interval_s": interval_s, "steps": steps, "batch_size": batch_size}


# --- ZeRO-1 ---------------------------------------------------------------------------------------

def _zero_job(place: RankPlace, emit: Callable) -> None:
    with job_group(place, 60):
        torch.manual_seed(0)
        model = DDP(MLP())
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-3,
                                            weight_decay=1e-5)
        generator = torch.Generator().manual_seed(place.rank)  # each rank its own batch
        images, labels = torch.randn(32, 784, generator=generator), torch.randint(0, 10, (32,), generator=generator)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()  # each rank updates its shard, then broadcasts it to the others
        names = {id(p): name for name, p in model.module.named_parameters()}
        owned = [names[id(p)] for p in optimizer.optim.state]
        state = sum(t.numel() * t.element_size() for s in optimizer.optim.state.values()
                    for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        emit("result", {"owned": owned, "state_bytes": state, "digest": _digest(model)})


def compact_names(names: list[str]) -> str:
    """Parameter names grouped by their ending, for a narrow table: ['net.3.weight', 'net.6.weight',
    'net.0.bias'] -> 'net.{3,6}.weight, net.0.bias'."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        if name.count(".") < 2:  # nothing to group by
            groups[(name, "")] = [""]
            continue
        head, middle, tail = name.rsplit(".", 2)
        groups.setdefault((head, tail), []).append(middle)
    out = []
    for (head, tail), middles in groups.items():
        middle = middles[0] if len(middles) == 1 else "{" + ",".join(middles) + "}"
        out.append(".".join(x for x in (head, middle, tail) if x))
    return ", ".join(out)


def zero_state(world_size: int, timeout_s: float = 120) -> dict[int, dict]:
    """One step of DDP with ``ZeroRedundancyOptimizer`` (Adam) on gloo: per rank, the parameters whose
    optimizer state it keeps, that state's bytes (Adam's two moments), and a digest of the model after
    the step (equal on every rank: each shard's owner broadcasts its update)."""
    return run_workers(_zero_job, world_size, (), launch_timeout_s=timeout_s)


def adam_state_bytes(model: nn.Module) -> int:
    """What plain Adam keeps for a model: two moments the size of every parameter."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters())


# --- four mistakes --------------------------------------------------------------------------------

class _WithSpareHead(nn.Module):
    """The MLP with a second head that forward never uses (a leftover of an experiment, say)."""

    def __init__(self):
        super().__init__()
        self.body, self.spare = MLP(dropout=0.0), nn.Linear(10, 10)

    def forward(self, x):
        return self.body(x)


def _batch(seed: int, n: int = 32, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 784, generator=generator, dtype=dtype), torch.randint(0, 10, (n,), generator=generator)


def _saving(rank: int) -> dict:
    wrapped = DDP(MLP())
    keys = list(wrapped.state_dict())
    try:
        MLP().load_state_dict(wrapped.state_dict())
        wrong = "loaded"
    except RuntimeError as exc:
        wrong = _said(exc)
    MLP().load_state_dict(wrapped.module.state_dict())
    return {"ddp_keys": keys[:2], "module_keys": list(wrapped.module.state_dict())[:2],
            "load_ddp_state_dict": wrong, "load_module_state_dict": "loaded"}


def _unused(rank: int) -> dict:
    out = {}
    for find in (False, True):
        model = DDP(_WithSpareHead(), find_unused_parameters=find)
        try:
            images, labels = _batch(rank)
            for step in range(2):
                F.cross_entropy(model(images), labels).backward()
            out[f"find_unused_parameters={find}"] = "2 steps done"
        except RuntimeError as exc:
            out[f"find_unused_parameters={find}"] = f"step {step + 1}: {_said(exc)}"
            named = re.search(r"Parameter indices which did not receive grad for rank \d+: [\d ]+", str(exc))
            out["which parameters, in torch's words"] = named.group(0).strip() if named else "(not named)"
    return out


def _uneven(rank: int, short: int, long: int, timeout_s: float) -> dict:
    """Rank 0 has ``short`` batches, the others ``long``: with Join the job ends; without, a rank waits
    in an all-reduce nobody else joins (here on a group with a short timeout, to see it fail)."""
    n = short if rank == 0 else long
    out = {"batches": n}
    torch.manual_seed(0)
    model = DDP(MLP(dropout=0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Join([model]):
        for i in range(n):
            optimizer.zero_grad()
            images, labels = _batch(10 * rank + i)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    out["with Join"] = f"{n} steps done, model digest {_digest(model)}"
    group = dist.new_group(timeout=timedelta(seconds=timeout_s))
    model = DDP(MLP(dropout=0.0), process_group=group)
    began = time.perf_counter()
    try:
        for i in range(n):
            images, labels = _batch(i)
            F.cross_entropy(model(images), labels).backward()
        out["without Join"] = f"{n} steps done"
    except RuntimeError as exc:
        out["without Join"] = (f"step {i + 1} waited {time.perf_counter() - began:.0f} s, then "
                               f"{_said(exc, 110)}")
    dist.barrier()  # rank 0 waits here (on the default group) until the others have given up
    return out


SENT = "gradients all-reduced per step"  # the accumulation lesson's columns (|d|: the largest absolute difference)
APART = "|d| between the ranks"
OFF = "|d| from all-reducing every micro-batch"


def _accumulation(rank: int) -> dict:
    """Two micro-batches of 16 per step, in float64 (sums of gradients then compare to rounding). A hook
    counts what DDP all-reduces, in gradients' worth (the bucket count varies: DDP rebuilds its buckets
    after the first iteration)."""
    out = {}
    for case, skip in (("no_sync on the first micro-batch", (True, False)),
                       ("no_sync on both (the mistake)", (True, True)),
                       ("no no_sync: every backward all-reduces", (False, False))):
        torch.manual_seed(0)
        model = DDP(MLP(dropout=0.0).double())
        calls = []

        def counting(state, bucket):  # the default hook's work (average the bucket), counting what it sends
            calls.append(bucket.buffer().numel())
            return dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future().then(
                lambda fut: fut.value()[0])

        model.register_comm_hook(None, counting)
        for micro, no_sync in enumerate(skip):
            images, labels = _batch(2 * rank + micro, 16, torch.float64)
            if no_sync:
                with model.no_sync():
                    (F.cross_entropy(model(images), labels) / len(skip)).backward()
            else:
                (F.cross_entropy(model(images), labels) / len(skip)).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        everyone = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, grads)
        out[case] = {SENT: round(sum(calls) / grads.numel()), APART: max(float((g - grads).abs().max()) for g in everyone),
                     "grads": grads}
    reference = out["no no_sync: every backward all-reduces"]["grads"]
    for case in out.values():
        case[OFF] = float((case.pop("grads") - reference).abs().max())
    return out


def _set_epoch(rank: int, samples: int = 12, epochs: int = 3) -> dict:
    """The indices this rank's DistributedSampler hands out in each epoch, with and without
    ``set_epoch``: the shuffle is seeded by seed + epoch, and the epoch stays 0 unless it is set."""
    out = {}
    for case, call in (("without set_epoch", False), ("with set_epoch(epoch)", True)):
        sampler = DistributedSampler(range(samples), num_replicas=dist.get_world_size(), rank=rank, shuffle=True, seed=0)
        orders = []
        for epoch in range(epochs):
            if call:
                sampler.set_epoch(epoch)
            orders.append(list(sampler))
        out[case] = orders
    return out


def _mistakes_job(place: RankPlace, emit: Callable, timeout_s: float) -> None:
    with job_group(place, 60):
        emit("result", {"saving": _saving(place.rank), "unused parameters": _unused(place.rank),
                        "uneven inputs": _uneven(place.rank, 3, 5, timeout_s),
                        "accumulation": _accumulation(place.rank), "set_epoch": _set_epoch(place.rank)})


def mistakes(uneven_timeout_s: float = 3, timeout_s: float = 180) -> dict[int, dict]:
    """Five mistakes on two gloo ranks, each made and avoided: saving the DDP wrapper's state dict,
    a parameter forward never uses, uneven numbers of batches, ``no_sync`` with accumulation, and a
    DistributedSampler whose epoch is never set."""
    return run_workers(_mistakes_job, 2, (uneven_timeout_s,), launch_timeout_s=timeout_s)


def check_mistakes(mistakes: dict[int, dict]) -> dict[str, bool]:
    """What each of the five lessons must show, on both ranks, as named claims."""
    m0, m1 = mistakes[0], mistakes[1]
    acc = list(m0["accumulation"].values())
    orders = {rank: m["set_epoch"] for rank, m in mistakes.items()}
    unused = [m["unused parameters"] for m in (m0, m1)]
    joined = [m["uneven inputs"]["with Join"].split("digest")[1] for m in (m0, m1)]
    return {
        "1. DDP's keys start with 'module.'; a plain model refuses them, takes model.module's":
            m0["saving"]["ddp_keys"][0].startswith("module.") and "Missing key" in m0["saving"]["load_ddp_state_dict"]
            and m0["saving"]["load_module_state_dict"] == "loaded",
        "2. an unused parameter stops step 2; find_unused_parameters=True runs":
            all(u["find_unused_parameters=False"].startswith("step 2: RuntimeError")
                and u["find_unused_parameters=True"] == "2 steps done" for u in unused),
        "3. with Join the ranks end equal; without, rank 1 waits in step 4 until the timeout":
            joined[0] == joined[1] and m1["uneven inputs"]["without Join"].startswith("step 4 waited"),
        "4. gradients sent 1, 0, 2 times; ranks equal, apart, equal; no_sync's sum = every step's":
            [a[SENT] for a in acc] == [1, 0, 2] and acc[0][APART] == 0 == acc[2][APART] and acc[1][APART] > 0
            and acc[0][OFF] < 1e-12,
        "5. without set_epoch every epoch repeats epoch 0's order; the ranks' shares never overlap":
            all(len({tuple(o) for o in s["without set_epoch"]}) == 1 and len({tuple(o) for o in s["with set_epoch(epoch)"]}) > 1
                for s in orders.values())
            and all(not set(a) & set(b) for a, b in zip(orders[0]["with set_epoch(epoch)"], orders[1]["with set_epoch(epoch)"])),
    }
