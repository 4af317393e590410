"""Helpers shared by the multi-process tests."""

from pathlib import Path


def no_process_left(pids) -> bool:
    """True when none of the given process ids is alive (or a zombie) any more."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(") ", 1)[1][0] != "Z":
                    return False
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return True


def spawned_workers_of(pid) -> list[int]:
    """Child processes started by multiprocessing's spawn (the ranks, not its resource tracker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(p) for p in fh.read().split()]
    except FileNotFoundError:
        return []
    workers = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline") as fh:
                if "spawn_main" in fh.read():
                    workers.append(child)
        except FileNotFoundError:
            pass
    return workers


def processes_with(marker: str) -> list[int]:
    """Ids of the live processes whose command line contains ``marker`` (e.g. a test's tmp_path)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:  # ended while we looked
            pass
    return found


def processes_in_session(sid: int) -> list[int]:
    """Ids of the live processes (not zombies) in session ``sid``: all that a process started with
    start_new_session=True left behind, however deep (orphans keep their session)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                state, _, _, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
                if int(session) == sid and state != "Z":
                    found.append(int(entry.name))
        except OSError:  # ended while we looked
            pass
    return found


EXACT = 1e-9  # float64 runs of the same arithmetic in another order agree far below this on any CPU


def max_difference(a, b) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


def overlap_local_sgd_job(place, emit):
    """Two ranks drive the overlapped local SGD by hand (every=2) with known weights:
    rank r sets its weights to a_r, then adds its own progress d_r after the first average."""
    import torch

    from ddp_helpers.dist import job_group
    from ddp_helpers.sync import OverlapLocalSGDSync

    a, d = [[1.0, 2.0], [3.0, 6.0]][place.rank], [[0.5, 0.0], [0.0, -1.0]][place.rank]
    with job_group(place, 30) as ctx:
        model = torch.nn.Linear(2, 1, bias=False)
        sync = OverlapLocalSGDSync(model, torch.optim.SGD(model.parameters(), lr=0.1), every=2, transport=ctx.transport)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([a]))
        sync.after_step()
        sync.after_step()  # sends the snapshot a_r; weights unchanged until it is collected
        unchanged = model.weight.tolist()[0]
        with torch.no_grad():
            model.weight.add_(torch.tensor([d]))
        sync.after_step()
        sync.after_step()  # collects: mean(a) + d_r, and sends a new snapshot
        collected = model.weight.tolist()[0]
        sync.consolidate()  # the pending average, then a blocking one: mean(a) + mean(d) on both ranks
        emit("result", {"unchanged": unchanged, "collected": collected, "final": model.weight.tolist()[0]})


def killed_by_sigkill_job(place, emit):
    """Rank 1 is killed by a signal (as the kernel's out-of-memory killer would); rank 0 waits."""
    import os
    import signal
    import time

    if place.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def own_error_saying_timed_out_job(place, emit):
    """Rank 1 fails by itself, with an error whose words say "timed out"; rank 0 waits for it in a
    collective and, when that fails, goes on waiting (as a rank under NCCL does until its watchdog
    fires). Blame by the words of an error would take rank 1's for one about a peer and name rank 0."""
    import time

    import torch.distributed as dist

    from ddp_helpers.dist import job_group

    with job_group(place, 30):
        if place.rank == 1:
            raise RuntimeError("my own check timed out")
        try:
            dist.barrier()
        except RuntimeError:
            time.sleep(60)


def aborted_while_a_peer_is_silent_job(place, emit):
    """Both ranks send a heartbeat; rank 0 then goes silent, and rank 1 ends 4 s later by SIGABRT
    without a Python error (as NCCL's watchdog ends a rank whose collective timed out)."""
    import os
    import resource
    import time

    emit("progress", {"step": 0, "epoch": 1, "time": time.time()})
    if place.rank == 0:
        time.sleep(60)
    time.sleep(4)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file where the tests run
    os.abort()


def place_job(place, emit):
    """What a spawned rank knows of itself, and whether it could take its store's port (the parent holds it)."""
    import os
    import socket

    with socket.socket() as s:
        try:
            s.bind((place.master_addr, place.master_port))
            port_taken = False
        except OSError:
            port_taken = True
    emit("result", {"rank": place.rank, "world_size": place.world_size, "local_rank": place.local_rank,
                    "launcher": place.launcher, "agent_store": place.agent_store, "port_taken": port_taken,
                    "RANK": os.environ.get("RANK")})


def shm_exactness_job(place, emit, sizes):
    """Each rank all-reduces random float32 tensors (seed = its rank) through shared memory and, at
    two ranks, through gloo too; it sends back what it ended with. The first tensor sets the
    segment's size, the larger ones after it go through in pieces."""
    import torch

    from ddp_helpers.dist import job_group, job_store
    from ddp_helpers.transport import Gloo, SharedMemory

    torch.set_num_threads(1)
    with job_group(place, 30):
        shm = SharedMemory(job_store(place, 30), place.rank, [0] * place.world_size, timeout_s=30)
        out = []
        for n in sizes:
            x = torch.randn(n, generator=torch.Generator().manual_seed(1000 * place.rank + n))
            mine = shm.all_reduce_(x.clone())
            theirs = Gloo().all_reduce_(x.clone()) if place.world_size == 2 else None
            out.append({"input": x, "shm": mine, "gloo": theirs})
        shm.close()
        emit("result", out)


def peer_fails_inside_shm_job(place, emit, how):
    """Two ranks all-reduce through shared memory once; then rank 1 fails (``how``: killed by a
    signal, or it stops making progress) while rank 0 waits for it in the next all-reduce."""
    import os
    import signal
    import time

    import torch

    from ddp_helpers.dist import job_group, job_store
    from ddp_helpers.transport import SharedMemory

    with job_group(place, 3):
        shm = SharedMemory(job_store(place, 3), place.rank, [0, 0], timeout_s=3)
        shm.all_reduce_(torch.ones(1000))
        emit("progress", {"step": 1, "epoch": 1, "time": time.time()})
        if place.rank == 1:
            if how == "SIGKILL":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(120)
        shm.all_reduce_(torch.ones(1000))


def hierarchical_job(place, emit):
    """Four ranks said to be on two nodes of two (ranks 0-1, 2-3): shared memory within each pair,
    the pairs' first ranks over gloo; each rank sends back its input and what it ended with."""
    import torch

    from ddp_helpers.dist import job_group, job_store
    from ddp_helpers.transport import SharedMemory

    torch.set_num_threads(1)
    with job_group(place, 30):
        shm = SharedMemory(job_store(place, 30), place.rank, [0, 0, 1, 1], timeout_s=30)
        x = torch.randn(100_003, generator=torch.Generator().manual_seed(place.rank))
        emit("result", {"input": x, "sum": shm.all_reduce_(x.clone()), "leaders": shm.nodes})
        shm.close()
