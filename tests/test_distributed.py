"""Multi-process behaviour: DDP against a single-process reference, failures, torchrun.

Each spawn costs seconds here (every child imports torch), so the 2-rank runs are
module-scoped fixtures shared by several tests.
"""

import os
import subprocess
import sys
import time

import pytest
import torch

from ddp_helpers import TrainConfig, WorkerError, launch, run_single_process
from processes import max_difference, no_process_left

# A few hundred steps on real MNIST, dropout off so that DDP and one process can match exactly.
SMALL = dict(dataset="mnist", train_subset=2048, test_subset=1000, epochs=2, dropout=0.0, seed=3,
             lr_step=1, timeout_s=60, launch_timeout_s=240)


@pytest.fixture(scope="module")
def ddp_run():
    return launch(TrainConfig(world_size=2, batch_size=16, sync="ddp", **SMALL))


@pytest.fixture(scope="module")
def allreduce_run():
    return launch(TrainConfig(world_size=2, batch_size=16, sync="allreduce", **SMALL))


@pytest.fixture(scope="module")
def reference_run():
    """One process with the global batch (2 x 16) over the same samples."""
    return run_single_process(TrainConfig(world_size=1, batch_size=32, **SMALL))


def test_two_rank_run_returns_metrics_and_describes_itself(ddp_run):
    record = ddp_run.record
    assert [row["epoch"] for row in record["epochs"]] == [1, 2]
    row = record["epochs"][-1]
    assert row["steps_per_worker"] == 2048 // 2 // 16
    assert row["train_samples"] == 2048 and row["val_samples"] == 1000
    assert row["val_accuracy"] > 0.85  # a real model learned real digits
    assert set(row["step_ms"]) == {"data", "compute", "sync", "optimizer", "total"}
    assert row["step_ms"]["sync"] > 0
    rt = record["runtime"]
    assert (rt["backend"], rt["rank_count"], rt["sync"], rt["global_batch"]) == ("gloo", 2, "ddp", 32)
    assert rt["threads_per_rank"] >= 1 and rt["optimizer"].startswith("Adam")
    env = record["environment"]
    assert env["torch"] == torch.__version__ and env["cpu_cores_usable"] >= 1 and env["cpu_model"]
    assert TrainConfig.from_dict(record["config"]).world_size == 2


def test_ddp_matches_one_process_with_the_global_batch(ddp_run, reference_run):
    """W ranks of batch B end where one process with batch W*B ends (to float tolerance)."""
    assert max_difference(ddp_run.state_dict, reference_run.state_dict) < 1e-4
    for a, b in zip(ddp_run.history, reference_run.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=2e-3)
        assert a["lr"] == b["lr"]


def test_manual_allreduce_gives_the_same_parameters_as_ddp(ddp_run, allreduce_run):
    assert max_difference(ddp_run.state_dict, allreduce_run.state_dict) < 1e-5
    assert allreduce_run.record["runtime"]["sync"] == "allreduce"


def test_a_rank_that_raises_makes_launch_raise_promptly_and_leaves_no_process():
    cfg = TrainConfig(world_size=2, dataset="synthetic", train_subset=512, test_subset=64, epochs=1,
                      fail_rank=1, fail_step=3, timeout_s=30, launch_timeout_s=120)
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launch(cfg)
    elapsed = time.monotonic() - start
    assert info.value.rank == 1 and "injected fault: rank 1 failed at step 3" in str(info.value)
    assert elapsed < 60
    assert no_process_left(info.value.pids)


def test_a_rank_that_exits_hard_is_reported_with_its_exit_code():
    cfg = TrainConfig(world_size=2, dataset="synthetic", train_subset=512, test_subset=64, epochs=1,
                      fail_rank=0, fail_step=2, fail_kind="exit", timeout_s=30, launch_timeout_s=120)
    with pytest.raises(WorkerError) as info:
        launch(cfg)
    assert info.value.rank == 0 and "exited with code 17" in str(info.value)
    assert no_process_left(info.value.pids)


def test_a_busy_port_given_explicitly_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"port 127.0.0.1:{port} is not available.*--master-port"):
            launch(TrainConfig(world_size=2, dataset="synthetic", master_port=port))


def run_cli(*args, timeout=150, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_cli_trains_and_writes_a_record(tmp_path):
    out = run_cli("-m", "ddp_helpers", "train", "--world-size", "1", "--dataset", "synthetic",
                  "--train-subset", "256", "--test-subset", "64", "--epochs", "2",
                  "--output-dir", str(tmp_path), "--run-name", "cli")
    assert out.returncode == 0, out.stderr
    assert "val acc" in out.stdout and "record written to" in out.stdout
    import json

    record = json.loads((tmp_path / "cli.json").read_text())
    assert len(record["epochs"]) == 2 and record["config"]["dataset"] == "synthetic"


def test_cli_reports_bad_values_without_a_traceback():
    out = run_cli("-m", "ddp_helpers", "train", "--world-size", "0")
    assert out.returncode == 2
    assert "TrainConfig.world_size=0 is invalid" in out.stderr and "Traceback" not in out.stderr


def test_the_same_worker_runs_under_torchrun(tmp_path):
    out = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  "-m", "ddp_helpers", "train", "--dataset", "synthetic", "--train-subset", "512",
                  "--test-subset", "64", "--epochs", "1", "--no-progress",
                  "--output-dir", str(tmp_path), "--run-name", "torchrun")
    assert out.returncode == 0, out.stdout + out.stderr
    import json

    record = json.loads((tmp_path / "torchrun.json").read_text())
    assert record["runtime"]["rank_count"] == 2 and record["runtime"]["backend"] == "gloo"
    assert out.stdout.count("record written to") == 1  # only rank 0 reports


def test_ranks_leave_together_and_rank_0_leaves_last():
    """The exit protocol in the store: nobody passes before everyone has finished; rank 0,
    which may host the store, waits until the others have left."""
    import threading

    from torch.distributed import HashStore

    from ddp_helpers.dist import leave_together

    store, left = HashStore(), []

    def rank(r):
        leave_together(store, r, 3, timeout_s=30)
        left.append(r)

    threads = {r: threading.Thread(target=rank, args=(r,)) for r in range(3)}
    for r in (0, 1):
        threads[r].start()
    time.sleep(0.3)
    assert left == []  # rank 2 has not finished yet
    threads[2].start()
    for t in threads.values():
        t.join(30)
    assert sorted(left) == [0, 1, 2] and left[-1] == 0


def test_a_rank_that_never_arrives_makes_leaving_time_out_instead_of_hanging():
    from torch.distributed import HashStore

    from ddp_helpers.dist import leave_together

    start = time.monotonic()
    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        leave_together(HashStore(), 0, 2, timeout_s=1)
    assert time.monotonic() - start < 10
