"""Fault tolerance: checkpoints, resume, crashed and hung workers, Ctrl-C, torchrun restarts."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from ddp_helpers import TrainConfig, WorkerError, launch
from ddp_helpers.faults import injected
from ddp_helpers.checkpoint import (CheckpointError, checkpoint_path, latest_good_checkpoint, list_checkpoints,
                                    load_checkpoint, save_checkpoint)
from processes import no_process_left, spawned_workers_of

SMALL = dict(dataset="mnist", device="cpu", train_subset=2048, test_subset=1000, epochs=3, seed=11,
             timeout_s=60, launch_timeout_s=240)


def tiny_state(epoch, lr=1e-3):
    return {"epoch": epoch, "global_step": 10 * epoch, "model": {"w": torch.full((3,), float(epoch))},
            "optimizer": {}, "scheduler": {}, "history": [], "rng": [torch.get_rng_state()],
            "config": TrainConfig(lr=lr).to_dict()}


def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, tiny_state(1), keep=2)
    import ddp_helpers.files as files

    def killed_before_it_is_on_disk(fd):
        raise KeyboardInterrupt("killed while saving")  # the new file is written, not yet synced or renamed

    monkeypatch.setattr(files.os, "fsync", killed_before_it_is_on_disk)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, tiny_state(2), keep=2)
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_epoch0001.pt"]  # no temp file left
    assert load_checkpoint(checkpoint_path(tmp_path, 1))["epoch"] == 1


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for epoch in range(1, 5):
        save_checkpoint(tmp_path, tiny_state(epoch), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_epoch0004.pt", "ckpt_epoch0003.pt"]


def test_a_new_run_never_prunes_its_own_checkpoint_for_newer_ones(tmp_path):
    for epoch in (5, 4):  # left by another run
        save_checkpoint(tmp_path, tiny_state(epoch), keep=2)
    save_checkpoint(tmp_path, tiny_state(1), keep=2)
    assert checkpoint_path(tmp_path, 1).exists() and checkpoint_path(tmp_path, 5).exists()


def test_a_new_run_into_a_folder_with_checkpoints_is_refused_before_any_work(tmp_path):
    save_checkpoint(tmp_path, tiny_state(3), keep=2)
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        launch(TrainConfig(world_size=2, dataset="synthetic", checkpoint_dir=str(tmp_path)), live=False)
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 3)]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_good_one_used(tmp_path, damage):
    save_checkpoint(tmp_path, tiny_state(1), keep=3)
    newest = save_checkpoint(tmp_path, tiny_state(2), keep=3)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="ckpt_epoch0002.pt.*corrupt or truncated"):
        load_checkpoint(newest)
    state, notes = latest_good_checkpoint(tmp_path, TrainConfig().to_dict())
    assert state["epoch"] == 1
    assert "skipped" in notes[0] and "resumed from" in notes[1]
    assert newest.exists()  # reported, not deleted


def test_a_checkpoint_of_another_run_is_refused_naming_the_fields(tmp_path):
    save_checkpoint(tmp_path, tiny_state(1, lr=1e-3), keep=2)
    with pytest.raises(CheckpointError, match=r"different run \(lr: checkpoint 0.001 vs run 0.002\).*Fix:"):
        latest_good_checkpoint(tmp_path, TrainConfig(lr=2e-3).to_dict())


def test_loading_never_runs_pickled_code(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    torch.save({"format": 1, "model": {}, "payload": subprocess.Popen}, path)  # not a plain tensor/dict/number
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_resume_needs_a_checkpoint_dir():
    with pytest.raises(ValueError, match="resume.*checkpoint_dir"):
        TrainConfig(resume=True)


def test_interrupted_and_resumed_equals_uninterrupted_with_two_ranks(tmp_path):
    """Dropout on, so the per-rank RNG states in the checkpoint matter too. The journal beside the run
    keeps the epochs that finished before the crash, and the resumed run appends to it."""
    from ddp_helpers.report import read_journal

    whole = launch(TrainConfig(world_size=2, checkpoint_dir=str(tmp_path / "a"), **SMALL))
    steps = whole.history[0]["steps_per_worker"]
    broken = TrainConfig(world_size=2, checkpoint_dir=str(tmp_path / "b"), **SMALL)
    journal = tmp_path / "run.epochs.jsonl"
    with pytest.raises(WorkerError, match="rank 1 failed"), injected(rank=1, step=steps + steps // 2):
        launch(broken, journal=journal)  # dies half-way through epoch 2
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["ckpt_epoch0001.pt"]
    rows = read_journal(journal)
    assert [row["epoch"] for row in rows] == [1] and "val_accuracy" in rows[0]  # the crash kept epoch 1
    resumed = launch(broken.replace(resume=True), journal=journal)
    assert any("resumed from" in n and "epoch 1" in n for n in resumed.record["runtime"]["notes"])
    assert len(resumed.history) == 3
    assert [row["epoch"] for row in read_journal(journal)] == [1, 2, 3]  # appended, epoch 1 kept
    # the same arithmetic in the same order, the RNG states restored: bit for bit the same
    for a, b in zip(whole.history, resumed.history):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert a[key] == b[key], key
    assert all(torch.equal(whole.state_dict[k], resumed.state_dict[k]) for k in whole.state_dict)


def test_a_hung_rank_is_named_with_its_last_step_and_its_stack():
    """Rank 1 stops at step 3; rank 0's collective times out. The report blames rank 1."""
    cfg = TrainConfig(world_size=2, dataset="synthetic", train_subset=512, test_subset=64, epochs=1, timeout_s=5,
                      launch_timeout_s=120)
    with pytest.raises(WorkerError) as info, injected(rank=1, step=3, kind="hang"):
        launch(cfg)
    message = str(info.value)
    assert info.value.rank == 1 and "stopped making progress" in message
    assert "rank 0 timed out waiting for it" in message
    assert "in before_step" in message  # the hung rank's Python stack: where it stopped
    assert no_process_left(info.value.pids)


def test_a_worker_frozen_from_outside_is_named_and_nothing_is_left_running():
    """SIGSTOP on rank 1 half-way through: no Python error anywhere, only silence."""
    frozen = {}

    def freeze_rank_1(event):
        if event.rank == 1 and event.kind == "progress" and event.payload["step"] >= 10 and not frozen:
            frozen["pid"] = event.payload["pid"]
            os.kill(frozen["pid"], signal.SIGSTOP)

    cfg = TrainConfig(world_size=2, dataset="synthetic", train_subset=60000, test_subset=64, epochs=1,
                      timeout_s=5, launch_timeout_s=120)
    with pytest.raises(WorkerError) as info:
        launch(cfg, on_event=freeze_rank_1)
    assert frozen and info.value.rank == 1
    assert "stopped making progress (its last heartbeat was at step" in str(info.value)
    assert "Python stack of rank 1" in str(info.value)
    assert no_process_left(info.value.pids)


def test_a_checkpoint_dir_that_cannot_be_created_fails_before_any_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    events = []
    with pytest.raises(OSError, match="--checkpoint-dir.*cannot be used.*Fix:"):
        launch(TrainConfig(world_size=2, dataset="synthetic", checkpoint_dir=str(blocker / "ckpt")),
               on_event=events.append)
    assert events == []  # no worker was started
    assert blocker.read_text() == "not a folder"


def test_a_worker_killed_by_a_signal_is_reported_by_rank_and_signal():
    from ddp_helpers.workers import run_workers
    from processes import killed_by_sigkill_job

    with pytest.raises(WorkerError) as info:
        run_workers(killed_by_sigkill_job, 2, launch_timeout_s=120)
    assert info.value.rank == 1 and "the process was killed by SIGKILL" in str(info.value)
    assert no_process_left(info.value.pids)


def test_a_rank_whose_own_error_says_timed_out_is_named_not_the_peer_that_waits_for_it():
    """Blame rests on which rank failed first and who went silent, not on the words of an error."""
    from ddp_helpers.workers import run_workers
    from processes import own_error_saying_timed_out_job

    with pytest.raises(WorkerError) as info:
        run_workers(own_error_saying_timed_out_job, 2, launch_timeout_s=120)
    assert info.value.rank == 1 and "RuntimeError: my own check timed out" in str(info.value)
    assert no_process_left(info.value.pids)


def test_a_rank_aborted_without_an_error_while_a_peer_is_silent_names_the_silent_peer():
    """SIGABRT and no Python error, as NCCL's watchdog ends a rank that timed out: the peer whose
    heartbeat went stale is named, whatever the aborted rank's output says."""
    from ddp_helpers.workers import run_workers
    from processes import aborted_while_a_peer_is_silent_job

    with pytest.raises(WorkerError) as info:
        run_workers(aborted_while_a_peer_is_silent_job, 2, launch_timeout_s=120)
    message = str(info.value)
    assert info.value.rank == 0 and "stopped making progress (its last heartbeat was at step 0" in message
    assert "rank 1 timed out waiting for it" in message and "rank 1: the process was killed by SIGABRT" in message
    assert "Python stack of rank 0" in message and "aborted_while_a_peer_is_silent_job" in message
    assert no_process_left(info.value.pids)


def test_launch_timeout_stops_every_worker_and_says_which_limit():
    pids = []
    cfg = TrainConfig(world_size=2, dataset="synthetic", train_subset=60000, test_subset=64, epochs=100,
                      timeout_s=60, launch_timeout_s=3)
    with pytest.raises(TimeoutError, match=r"longer than launch_timeout_s=3 s; all 2 workers were stopped"):
        launch(cfg, on_event=lambda e: pids.append(e.payload["pid"]) if e.kind == "started" else None)
    assert no_process_left(pids)


def test_ctrl_c_on_the_cli_stops_every_worker(tmp_path):
    journal = tmp_path / "run.epochs.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ddp_helpers", "train", "--world-size", "2", "--dataset",
                             "synthetic", "--train-subset", "2048", "--test-subset", "64", "--epochs", "1000",
                             "--no-progress", "--output-dir", str(tmp_path), "--run-name", "run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job ignores SIGINT, and its children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None and not (journal.exists() and journal.read_text()):
        time.sleep(0.1)  # polling a file the run writes: its first epoch's row says the ranks train
    workers = spawned_workers_of(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "all workers were stopped" in err
    assert no_process_left(workers)


# float64, dropout 0, the rate halved every epoch: resumed runs end where this uninterrupted one ends
EXACT64 = dict(dataset="mnist", device="cpu", train_subset=2048, test_subset=500, epochs=3, dropout=0.0, seed=11,
               lr_step=1, timeout_s=60, launch_timeout_s=240, dtype="float64")


@pytest.fixture(scope="module")
def uninterrupted64():
    """One uninterrupted W=2 run of EXACT64 (32 steps per epoch), shared by the tests that resume."""
    return launch(TrainConfig(world_size=2, **EXACT64), live=False)


def test_a_run_resumed_at_another_world_size_keeps_its_global_batch_and_its_arithmetic(tmp_path, uninterrupted64):
    """A W=2 checkpoint resumed at W=1: two micro-batches per step keep the global batch of 64. With
    dropout 0 each step averages the same 64 samples (rank r's W=2 batch is a micro-batch's worth of
    the same shuffle), so it ends where the uninterrupted W=2 run ends, to float64's rounding."""
    from processes import EXACT, max_difference

    whole = uninterrupted64
    first = TrainConfig(world_size=2, checkpoint_dir=str(tmp_path), **{**EXACT64, "epochs": 1})
    launch(first, live=False)
    smaller = launch(first.replace(world_size=1, epochs=3, resume=True), live=False)
    note = next(n for n in smaller.record["runtime"]["notes"] if n.startswith("resumed at world size"))
    assert note == ("resumed at world size 1 from a checkpoint made at world size 2: the global batch stays 64 "
                    "(2 micro-batch(es) of 32 per rank and step)")
    assert smaller.record["runtime"]["global_batch"] == 64 and smaller.history[-1]["optimizer_steps"] == 32
    assert max_difference(whole.state_dict, smaller.state_dict) < EXACT
    assert [a["lr"] for a in whole.history] == [b["lr"] for b in smaller.history]


def test_a_stop_asked_for_within_an_epoch_is_kept_there_and_resumes_to_the_same_weights(tmp_path, uninterrupted64):
    """The scheduler's warning, as the test hook raises it in rank 1 at global step 1: the ranks look
    every 16 steps and agree on the check after next, global step 48, in epoch 2 (32 steps per epoch);
    rank 0 checkpoints the epoch so far, and the resumed run skips the batches done and ends bit for
    bit where the uninterrupted run ends."""
    whole = uninterrupted64
    cfg = TrainConfig(world_size=2, checkpoint_dir=str(tmp_path), **EXACT64)
    with injected(rank=1, step=1, kind="preempt"):
        stopped = launch(cfg, live=False)
    stop = stopped.record["runtime"]["preempted"]
    assert stopped.record["status"] == "preempted" and (stop["epoch"], stop["step"]) == (2, 16)
    assert list_checkpoints(tmp_path)[0].name == "ckpt_epoch0001_step000016.pt"
    resumed = launch(cfg.replace(resume=True), live=False)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert resumed.history[1]["train_loss"] == whole.history[1]["train_loss"]  # the epoch's sums carried over
    assert all(torch.equal(whole.state_dict[k], resumed.state_dict[k]) for k in whole.state_dict)


class SilentStore:
    """A store whose host stopped answering: a TCPStore client then waits in get and check without
    end, whatever its timeout (measured; see ddp_helpers/bounded.py)."""

    def __init__(self):
        self.answering = True

    def check(self, keys):
        if not self.answering:
            threading.Event().wait()  # never returns
        return True


def test_a_store_that_stops_answering_fails_the_call_within_its_deadline_then_every_call_at_once():
    from ddp_helpers.bounded import BoundedStore
    from torch.distributed import DistStoreError

    silent = SilentStore()
    store = BoundedStore(silent, 0.2, "the job's store at 10.0.0.1:29500")
    assert store.check(["a"]) is True
    silent.answering = False
    with pytest.raises(DistStoreError, match=r"the job's store at 10\.0\.0\.1:29500 did not answer within 0\.2 s"):
        store.check(["a"])
    assert store.lost
    silent.answering = True  # the client stays blocked in the first call: the store is given up
    with pytest.raises(DistStoreError, match="stopped answering earlier"):
        store.check(["a"])
