"""Multi-node correctness under torchrun: resuming from node-local folders, naming a failed rank.

Two torchrun "nodes" on one machine meet over a c10d rendezvous on loopback, each with its own
checkpoint folder, as on a cluster without a shared filesystem.
"""

import json
import os
import subprocess
import sys
import time

import torch

from ddp_helpers import TrainConfig, launch
from ddp_helpers.checkpoint import list_checkpoints, save_checkpoint
from ddp_helpers.dist import find_free_port
from ddp_helpers.faults import VARIABLE
from processes import no_process_left, processes_with

# 512 samples, batch 32, 2 ranks: 8 steps per epoch; a fault's step counts from 0 over the whole run
SMALL = dict(dataset="synthetic", train_subset=512, test_subset=64, epochs=3, threads_per_rank=1)
IN_EPOCH_2 = 12
RUN_S = 90  # no torchrun job here needs half of this on 2 CPUs


def flags(**values) -> list[str]:
    return [arg for key, value in values.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def ended(proc: subprocess.Popen) -> tuple[str, str]:
    """The output of a torchrun job; one still running after RUN_S is told to stop its workers
    (torchrun does on SIGTERM), then killed."""
    try:
        return proc.communicate(timeout=RUN_S)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def two_nodes(tmp_path, name, torchrun_args, train_args, folders, fault=""):
    """Run the CLI as two torchrun nodes, node i with its own checkpoint folder ``folders[i]``:
    (exit codes, outputs). c10d ranks the nodes by address (it ignores --node-rank), so
    --local-addr makes node i rank i."""
    torchrun = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                f"127.0.0.1:{find_free_port()}", "--rdzv-id", name, *torchrun_args]
    train = ["-m", "ddp_helpers", "train", "--backend", "gloo", "--device", "cpu", "--no-progress",
             "--output-dir", str(tmp_path), "--run-name", name, *flags(**SMALL), *train_args]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--node-rank", str(i),
                               "--local-addr", f"127.0.0.{i + 1}", *torchrun, *train,
                               "--checkpoint-dir", str(folders[i])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, VARIABLE: fault}) for i in range(2)]
    outs = [ended(node) for node in nodes]
    return [node.returncode for node in nodes], [out + err for out, err in outs]


def test_a_restart_resumes_every_rank_from_rank_0s_folder_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    """Rank 1 is killed outright in epoch 2 (SIGKILL: it writes nothing); each node has its own folder,
    and only rank 0's holds checkpoints. Rank 0 names it from facts: its process, on this machine, is
    gone without a record."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    codes, outs = two_nodes(tmp_path, "restarted", ["--max-restarts", "1"], [], folders, fault=f"1:{IN_EPOCH_2}:kill")
    assert codes == [0, 0], outs
    assert "rank 1 failed: its process ended without a word after step" in outs[0], outs[0][-3000:]
    assert list_checkpoints(folders[0]) and not list_checkpoints(folders[1])
    record = json.loads((tmp_path / "restarted.json").read_text())
    assert record["runtime"]["rank_count"] == 2  # the two nodes formed one job
    assert any("resumed from" in n and "epoch 1" in n for n in record["runtime"]["notes"])
    # the same arithmetic on the CPU (gloo, one thread per rank), spawned and uninterrupted
    whole = launch(TrainConfig(world_size=2, backend="gloo", device="cpu", timeout_s=60, launch_timeout_s=RUN_S,
                               **SMALL), live=False)
    assert [row["epoch"] for row in record["epochs"]] == [1, 2, 3]
    for a, b in zip(whole.history, record["epochs"]):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert a[key] == b[key], (a["epoch"], key)


def test_a_checkpoint_of_another_run_in_rank_0s_folder_fails_every_rank_alike(tmp_path):
    """Only rank 0 reads its folder; rank 1 gets rank 0's error instead of a state (and no hang)."""
    other_run = TrainConfig(world_size=2, lr=2e-3, **SMALL).to_dict()
    save_checkpoint(tmp_path / "node0", {"epoch": 1, "global_step": 8, "model": {"w": torch.zeros(3)},
                                         "optimizer": {}, "scheduler": {}, "history": [], "rng": [],
                                         "config": other_run}, keep=2)
    # the collective timeout is far beyond RUN_S: a rank that waited for a state would be stopped by
    # ended() and print no error line, so two equal error lines mean that no rank waited
    codes, outs = two_nodes(tmp_path, "foreign", [], ["--resume", *flags(timeout_s=600)],
                            [tmp_path / "node0", tmp_path / "node1"])
    assert codes[0] != 0 and codes[1] != 0
    errors = [[line for line in out.splitlines() if line.startswith("error: ")] for out in outs]
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    assert "belongs to a different run (lr: checkpoint 0.002 vs run 0.001" in errors[0][0]


def torchrun_failing_rank_1(tmp_path, kind):
    """torchrun --standalone with two ranks, rank 1 failing in ``kind``; (exit code, all output, rank pids)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ddp_helpers", "train", "--backend", "gloo", "--device", "cpu", "--no-progress",
               "--output-dir", str(tmp_path), *flags(dataset="synthetic", train_subset=512, test_subset=64, epochs=1,
                                                      timeout_s=5)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", VARIABLE: f"1:3:{kind}"})
    ranks, deadline = [], time.monotonic() + RUN_S
    while proc.poll() is None and len(ranks) < 2 and time.monotonic() < deadline:
        ranks = [pid for pid in processes_with(str(tmp_path)) if pid != proc.pid]  # the agent's two workers
        time.sleep(0.1)
    out, err = ended(proc)
    return proc.returncode, out + err, ranks + [proc.pid]


def root_cause(output: str) -> str:
    """torchrun's summary of the failure it saw first."""
    return output.split("Root Cause (first observed failure):", 1)[-1]


def test_a_hung_rank_under_torchrun_is_named_in_the_error_and_in_torchruns_summary(tmp_path):
    code, output, pids = torchrun_failing_rank_1(tmp_path, "hang")
    assert code != 0
    named = "rank 1 failed: stopped making progress (its last heartbeat was at step"
    assert named in output and "rank 0 timed out waiting for it" in output, output[-4000:]
    assert named in root_cause(output)  # not only "local_rank 0 failed", with rank 1 as a mere SIGTERM
    assert len(pids) == 3 and no_process_left(pids)


def test_a_rank_that_raises_under_torchrun_is_named_with_its_error(tmp_path):
    code, output, pids = torchrun_failing_rank_1(tmp_path, "raise")
    assert code != 0
    assert "injected fault: rank 1 failed at step 3" in root_cause(output), output[-4000:]
    if "error: " in output:  # rank 0 said why it stopped (unless torchrun stopped it first)
        assert "error: rank 1 failed: RuntimeError: injected fault: rank 1 failed at step 3; " \
               "rank 0 stopped waiting for it" in output
    assert len(pids) == 3 and no_process_left(pids)
