"""Helpers shared by the multi-process tests."""


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


def max_difference(a, b) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


def overlap_local_sgd_job(rank, world_size, init_method, emit):
    """Two ranks drive the overlapped local SGD by hand (every=2) with known weights:
    rank r sets its weights to a_r, then adds its own progress d_r after the first average."""
    import torch

    from ddp_helpers import TrainConfig
    from ddp_helpers.dist import process_group
    from ddp_helpers.sync import OverlapLocalSGDSync

    a, d = [[1.0, 2.0], [3.0, 6.0]][rank], [[0.5, 0.0], [0.0, -1.0]][rank]
    with process_group(TrainConfig(world_size=world_size, timeout_s=30), rank, world_size, rank, init_method):
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
        torch.distributed.barrier()  # leave together (one gloo abort at exit was seen without it)
