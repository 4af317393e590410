"""Multi-process behaviour: DDP against a single-process reference, failures, torchrun.

Each spawn costs seconds here (every child imports torch), so the 2-rank runs are
module-scoped fixtures shared by several tests.
"""

import os
import subprocess
import sys

import pytest
import torch

from ddp_helpers import TrainConfig, WorkerError, launch
from ddp_helpers.faults import injected
from processes import EXACT, max_difference, no_process_left

# A few hundred steps on real MNIST, dropout off so that DDP and one process compute the same
# function, and float64 so that "the same" holds to 1e-9 on any CPU: float32 sums in another
# order round differently, and Adam amplifies that on near-zero gradients (1e-4 seen).
SMALL = dict(dataset="mnist", device="cpu", train_subset=2048, test_subset=1000, epochs=2, dropout=0.0,
             seed=3, lr_step=1, timeout_s=60, launch_timeout_s=240, dtype="float64")


@pytest.fixture(scope="module")
def ddp_run():
    return launch(TrainConfig(world_size=2, batch_size=16, sync="ddp", **SMALL))


@pytest.fixture(scope="module")
def allreduce_run():
    return launch(TrainConfig(world_size=2, batch_size=16, sync="allreduce", **SMALL))


@pytest.fixture(scope="module")
def reference_run():
    """One process with the global batch (2 x 16) over the same samples."""
    return launch(TrainConfig(world_size=1, batch_size=32, **SMALL))


def test_two_rank_run_returns_metrics_and_describes_itself(ddp_run):
    record = ddp_run.record
    assert [row["epoch"] for row in record["epochs"]] == [1, 2]
    row = record["epochs"][-1]
    assert row["steps_per_worker"] == 2048 // 2 // 16
    assert row["train_samples"] == 2048 and row["val_samples"] == 1000
    assert row["val_accuracy"] > 0.85  # a real model learned real digits
    phases = {k: v for k, v in row["step_ms"].items() if k != "total"}
    assert set(phases) == {"data", "compute", "sync", "optimizer"}
    assert sum(phases.values()) <= row["step_ms"]["total"]  # each second counted in one phase only, inside the step
    rt = record["runtime"]
    assert (rt["backend"], rt["rank_count"], rt["sync"], rt["global_batch"]) == ("gloo", 2, "ddp", 32)
    assert rt["optimizer"].startswith("Adam")
    assert set(record["environment"]) >= {"python", "torch", "cpu_model", "cpu_cores_usable", "hostname", "code"}
    assert TrainConfig.from_dict(record["config"]).world_size == 2


def test_ddp_matches_one_process_with_the_global_batch(ddp_run, reference_run):
    """W ranks of batch B end where one process with batch W*B ends (float64: to 1e-9)."""
    assert ddp_run.state_dict["net.0.weight"].dtype == torch.float64
    assert max_difference(ddp_run.state_dict, reference_run.state_dict) < EXACT
    for a, b in zip(ddp_run.history, reference_run.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=EXACT)
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["lr"] == b["lr"]


def test_manual_allreduce_gives_the_same_parameters_as_ddp(ddp_run, allreduce_run):
    assert max_difference(ddp_run.state_dict, allreduce_run.state_dict) < EXACT
    assert allreduce_run.record["runtime"]["sync"] == "allreduce"


def test_a_rank_that_raises_makes_launch_raise_promptly_and_leaves_no_process():
    """Promptly: the parent sees the exit itself. Waiting for the peer's collective to time
    out (timeout_s=600) would run into launch_timeout_s (a TimeoutError, not a WorkerError)."""
    cfg = TrainConfig(world_size=2, dataset="synthetic", train_subset=512, test_subset=64, epochs=1, timeout_s=600,
                      launch_timeout_s=120)
    with pytest.raises(WorkerError) as info, injected(rank=1, step=3):
        launch(cfg)
    assert info.value.rank == 1 and "injected fault: rank 1 failed at step 3" in str(info.value)
    assert no_process_left(info.value.pids)


def test_a_rank_that_exits_hard_is_reported_with_its_exit_code():
    cfg = TrainConfig(world_size=2, dataset="synthetic", train_subset=512, test_subset=64, epochs=1, timeout_s=30,
                      launch_timeout_s=120)
    with pytest.raises(WorkerError) as info, injected(rank=0, step=2, kind="exit"):
        launch(cfg)
    assert info.value.rank == 0 and "exited with code 17" in str(info.value)
    assert no_process_left(info.value.pids)


def test_spawned_ranks_read_torchrun_style_variables_and_the_launching_process_keeps_its_environment():
    """Each spawned worker is a rank as torchrun's workers are (the same variables, read the same way),
    and joins the store that the parent hosts; nothing of that lands in the parent's environment (a
    notebook kernel's)."""
    from ddp_helpers.workers import run_workers
    from processes import place_job

    before = dict(os.environ)
    got = run_workers(place_job, 3, launch_timeout_s=120)
    assert dict(os.environ) == before
    assert [(got[r]["rank"], got[r]["local_rank"], got[r]["world_size"], got[r]["RANK"]) for r in range(3)] == \
        [(0, 0, 3, "0"), (1, 1, 3, "1"), (2, 2, 3, "2")]
    assert all(got[r]["launcher"] == "spawn" and got[r]["agent_store"] and got[r]["port_taken"] for r in range(3))


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


def test_cli_reports_bad_values_without_a_traceback():
    out = run_cli("-m", "ddp_helpers", "train", "--world-size", "0")
    assert out.returncode == 2
    assert "TrainConfig.world_size=0 is invalid" in out.stderr and "Traceback" not in out.stderr
    assert "epoch" not in out.stdout  # no table header before the error


@pytest.mark.parametrize("flag", ["--sync", "--backend", "--device", "--dataset", "--dtype"])
def test_cli_enforces_the_choices(flag, capsys):
    from ddp_helpers.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", flag, "magic"])
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_cli_replays_a_record_and_flags_override_it(tmp_path):
    import json

    record = {"kind": "train", "config": TrainConfig(world_size=1, batch_size=64, lr=2e-3, dataset="synthetic",
                                                     train_subset=256, test_subset=64).to_dict()}
    (tmp_path / "old.json").write_text(json.dumps(record))
    out = run_cli("-m", "ddp_helpers", "train", "--config", str(tmp_path / "old.json"), "--lr", "5e-4",
                  "--print-config")
    assert out.returncode == 0, out.stderr
    cfg = TrainConfig.from_json(out.stdout)
    assert (cfg.batch_size, cfg.lr, cfg.dataset, cfg.world_size) == (64, 5e-4, "synthetic", 1)
    plain = tmp_path / "plain.json"
    plain.write_text(cfg.to_json())
    out = run_cli("-m", "ddp_helpers", "train", "--config", str(plain), "--epochs", "1", "--output-dir",
                  str(tmp_path), "--run-name", "replayed")
    assert out.returncode == 0, out.stderr
    assert "val acc" in out.stdout and "record written to" in out.stdout  # the CLI trains and writes its record
    record = json.loads((tmp_path / "replayed.json").read_text())
    replayed = record["config"]
    assert replayed["batch_size"] == 64 and replayed["epochs"] == 1 and len(record["epochs"]) == 1
    assert (tmp_path / "replayed.epochs.jsonl").read_text().count("\n") == 1  # the journal beside the record


def test_ranks_leave_together_and_rank_0_leaves_last():
    """The exit protocol, observed in the store at the moment each rank returns: nobody
    returns before every rank has finished, and rank 0 (which may host the store) returns
    only after every other rank has left. Keys are only ever added, so what a rank sees
    when it returns cannot be changed by the others afterwards: no race with the threads."""
    import threading
    from datetime import timedelta

    from torch.distributed import HashStore

    from ddp_helpers.dist import leave_together

    store, seen, world = HashStore(), {}, 3

    def rank(r):
        leave_together(store, r, world, timeout_s=60)
        seen[r] = {"all finished": store.check([f"exit/finished/{q}" for q in range(world)]),
                   "others left": store.check([f"exit/left/{q}" for q in range(1, world)])}

    threads = {r: threading.Thread(target=rank, args=(r,)) for r in range(world)}
    for r in (0, 1):
        threads[r].start()
    store.wait(["exit/finished/0", "exit/finished/1"], timedelta(seconds=60))  # both are in leave_together now
    assert seen == {}  # rank 2 has not finished: nobody may have returned
    threads[2].start()
    for t in threads.values():
        t.join(60)
    assert sorted(seen) == [0, 1, 2]
    assert all(s["all finished"] for s in seen.values())
    assert seen[0]["others left"]


def test_a_rank_that_never_arrives_makes_leaving_time_out_instead_of_hanging():
    from torch.distributed import HashStore

    from ddp_helpers.dist import leave_together

    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        leave_together(HashStore(), 0, 2, timeout_s=1)
