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


def overlap_local_sgd_job(rank, world_size, init_method, emit):
    """Two ranks drive the overlapped local SGD by hand (every=2) with known weights:
    rank r sets its weights to a_r, then adds its own progress d_r after the first average."""
    import torch

    from ddp_helpers.dist import process_group, tcp_store
    from ddp_helpers.local_sgd import OverlapLocalSGDSync

    a, d = [[1.0, 2.0], [3.0, 6.0]][rank], [[0.5, 0.0], [0.0, -1.0]][rank]
    with process_group(rank, world_size, tcp_store(init_method, rank, world_size, 30), timeout_s=30):
        model = torch.nn.Linear(2, 1, bias=False)
        sync = OverlapLocalSGDSync(model, torch.optim.SGD(model.parameters(), lr=0.1), every=2)
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


def powersgd_with_cuda_available_job(rank, world_size, init_method, emit):
    """A few PowerSGD steps on CPU tensors, with torch's PowerSGD hook believing that CUDA is
    available, as it does on a GPU machine (the rest of torch sees this machine as it is)."""
    import types

    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook_module

    from ddp_helpers import TrainConfig
    from ddp_helpers.dist import process_group, tcp_store
    from ddp_helpers.trainer import fit

    class TorchOnAGpuMachine:
        cuda = types.SimpleNamespace(is_available=lambda: True, synchronize=torch.cuda.synchronize)

        def __getattr__(self, name):
            return getattr(torch, name)

    hook_module.torch = TorchOnAGpuMachine()
    cfg = TrainConfig(world_size=world_size, sync="powersgd", backend="gloo", device="cpu", dataset="synthetic",
                      train_subset=512, test_subset=64, epochs=1, max_steps_per_epoch=6, timeout_s=30)
    with process_group(rank, world_size, tcp_store(init_method, rank, world_size, 30), timeout_s=30) as ctx:
        out = fit(cfg, ctx, lambda kind, payload: None)
        emit("result", {"cuda_available": hook_module.torch.cuda.is_available(),
                        "steps": out.history[0]["steps_per_worker"],
                        "device": str(next(out.model.parameters()).device)})


def killed_by_sigkill_job(rank, world_size, init_method, emit):
    """Rank 1 is killed by a signal (as the kernel's out-of-memory killer would); rank 0 waits."""
    import os
    import signal
    import time

    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
