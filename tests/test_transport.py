"""The same-host transport: an all-reduce through shared memory (ddp_helpers/shm.py), and DDP built
in the open on top of it (ddp_helpers/sync/bucketed.py). Exact, blamed like gloo when a peer fails,
and leaving nothing behind."""

import os
import subprocess
import sys
import time

import pytest
import torch

from ddp_helpers import TrainConfig, WorkerError, launch
from ddp_helpers.workers import run_workers
from processes import EXACT, max_difference, no_process_left, peer_fails_inside_shm_job, shm_exactness_job

# the first size sets the segment (4 KB); the gradient's size (567,434) and an odd one go through it in pieces
SIZES = [1024, 567_434, 1001]


def test_two_ranks_end_bitwise_equal_to_each_other_and_to_gloo():
    got = run_workers(shm_exactness_job, 2, (SIZES,), launch_timeout_s=120)
    for a, b in zip(got[0], got[1]):
        assert torch.equal(a["shm"], b["shm"]) and torch.equal(a["shm"], a["gloo"]) and torch.equal(b["gloo"], a["gloo"])


def test_three_ranks_sum_in_rank_order_and_end_bitwise_the_same():
    """Every element is added in one fixed order (rank 0's + rank 1's, + rank 2's), whichever rank adds
    it: the same float32 additions done here give bitwise the same tensor."""
    got = run_workers(shm_exactness_job, 3, (SIZES,), launch_timeout_s=120)
    for i in range(len(SIZES)):
        inputs = [got[r][i]["input"] for r in range(3)]
        in_order = (inputs[0] + inputs[1]) + inputs[2]
        assert all(torch.equal(got[r][i]["shm"], in_order) for r in range(3))


def test_across_nodes_each_node_sums_in_shared_memory_and_the_leaders_over_gloo():
    """Nodes (0, 1) and (2, 3): (x0 + x1) in one node, (x2 + x3) in the other, and their leaders add the
    two sums; every rank ends with that, bitwise."""
    from processes import hierarchical_job

    got = run_workers(hierarchical_job, 4, launch_timeout_s=120)
    x = [got[r]["input"] for r in range(4)]
    expected = (x[0] + x[1]) + (x[2] + x[3])
    assert got[0]["leaders"] == 2 and all(torch.equal(got[r]["sum"], expected) for r in range(4))


SMALL = dict(dataset="mnist", device="cpu", train_subset=2048, test_subset=500, epochs=1, dropout=0.0, seed=3,
             timeout_s=60, launch_timeout_s=240, dtype="float64", batch_size=16)


@pytest.fixture(scope="module")
def torch_ddp_on_gloo():
    return launch(TrainConfig(world_size=2, sync="ddp", comm="gloo", **SMALL), live=False)


def test_ddp_built_in_the_open_equals_torchs_ddp_and_one_process(torch_ddp_on_gloo, mnist):
    """Buckets of 0.25 MiB: three for this float64 gradient; each all-reduce starts from backward's
    hooks, through shared memory on a thread of its own. The arithmetic is DDP's (divide, then sum
    two), so the weights are bitwise torch's; against one process with the global batch, equal to
    1e-9. (Over gloo, the same layout as torch's DDP and the same weights at 0.25 MB: notebook 03's
    checked cell, which the suite runs.)"""
    cfg = TrainConfig(world_size=2, sync="bucketed", comm="shm", bucket_cap_mb=0.25, **SMALL)
    ours = launch(cfg, live=False)
    assert len(ours.record["runtime"]["buckets_bytes"]) == 3
    assert ours.record["runtime"]["comm"].startswith("shm")
    assert all(torch.equal(ours.state_dict[k], torch_ddp_on_gloo.state_dict[k]) for k in ours.state_dict)
    one = launch(TrainConfig(world_size=1, **{**SMALL, "batch_size": 32}), data=mnist, live=False)
    assert max_difference(ours.state_dict, one.state_dict) < EXACT


def test_ddp_over_shared_memory_equals_ddp_over_gloo_bitwise(torch_ddp_on_gloo):
    shm = launch(TrainConfig(world_size=2, sync="ddp", comm="shm", **SMALL), live=False)
    assert shm.record["runtime"]["comm"].startswith("shm") and torch_ddp_on_gloo.record["runtime"]["comm"] == "gloo"
    assert shm.record["runtime"]["buckets_bytes"] == [567_434 * 8]  # the real layout: one bucket at 25 MiB
    assert all(torch.equal(shm.state_dict[k], torch_ddp_on_gloo.state_dict[k]) for k in shm.state_dict)


@pytest.mark.parametrize("how", ["SIGKILL", "hang"])
def test_a_peer_that_fails_inside_the_shared_memory_collective_is_named(how):
    """Killed: the waiting rank sees its connection close at once. Hung: the waiting rank times out
    (3 s here) with the kind of error gloo's timeouts raise, not an OSError of its own, and the
    silent rank is named with its stack."""
    with pytest.raises(WorkerError) as info:
        run_workers(peer_fails_inside_shm_job, 2, (how,), launch_timeout_s=120)
    message = str(info.value)
    assert info.value.rank == 1
    if how == "SIGKILL":
        assert "the process was killed by SIGKILL" in message
    else:
        assert "stopped making progress" in message and "Python stack of rank 1" in message
        assert "rank 0: DistBackendError: shared-memory all-reduce: rank 0 timed out after 3 s waiting for rank(s) " \
               "[1]" in message
    assert no_process_left(info.value.pids)


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_a_parent_killed_outright_leaves_no_process_no_folder_and_nothing_in_dev_shm(tmp_path):
    """SIGKILL of the launching process while its two ranks all-reduce through shared memory: the
    ranks notice within a moment, remove the run's folder and end; the segment was never named."""
    from processes import spawned_workers_of

    before, temp = shm_entries(), tmp_path / "tmp"
    temp.mkdir()
    journal = tmp_path / "run.epochs.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ddp_helpers", "train", "--world-size", "2", "--comm", "shm",
                             "--dataset", "synthetic", "--train-subset", "2048", "--test-subset", "64", "--epochs",
                             "1000", "--no-progress", "--output-dir", str(tmp_path), "--run-name", "run"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(temp)})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None and not (journal.exists() and journal.read_text()):
        time.sleep(0.1)  # until its first epoch's row: the ranks are training
    workers = spawned_workers_of(proc.pid)
    assert len(workers) == 2 and list(temp.glob("ddp_run_*"))
    proc.kill()
    proc.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not no_process_left(workers):
        time.sleep(0.1)
    assert no_process_left(workers)
    assert not list(temp.glob("ddp_run_*"))  # (torch's own compile cache, torchinductor_<user>, may be there)
    assert shm_entries() <= before


def test_a_run_folder_whose_owner_is_gone_is_removed_by_the_next_run(tmp_path, monkeypatch):
    import tempfile

    from ddp_helpers.workers import remove_orphaned_run_folders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, mine = tmp_path / f"ddp_run_{dead.stdout.strip()}_x", tmp_path / f"ddp_run_{os.getpid()}_y"
    for folder in (stale, mine):
        folder.mkdir()
        (folder / "rank0.log").write_text("...")
    remove_orphaned_run_folders()
    assert not stale.exists() and mine.exists()
