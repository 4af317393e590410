"""The network lab: nodes in network namespaces joined by rate-limited links, torchrun over them,
the link model against hand-computed values, and nothing left behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ddp_helpers.study.comm import GRAD_BYTES
from ddp_helpers.study.costmodel import link_beta, predict_allreduce_on_link, predict_step_on_link, strategy_bytes
from ddp_helpers.study.netlab import PREFIX, NetLab, descendants, unavailable

from processes import no_process_left

WHY_NOT = unavailable()
needs_lab = pytest.mark.skipif(WHY_NOT is not None, reason=f"network lab unavailable: {WHY_NOT}")


def namespaces_of(pid: int) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(f"{PREFIX}{pid}-")]


def test_a_link_costs_its_rate_and_never_less_than_the_unshaped_link():
    beta_unshaped = 2e-9  # s/byte without a limit
    assert link_beta(2, beta_unshaped, 1000) == pytest.approx(8e-9)  # W=2: each rank sends the tensor once
    assert link_beta(4, beta_unshaped, 1000) == pytest.approx(1.5 * 8e-9)  # ring: 2(W-1)/W of it
    assert link_beta(2, beta_unshaped, 10_000) == beta_unshaped  # 0.8 ns/byte: the limit does not bind
    assert predict_allreduce_on_link(1_000_000, 2, 1e-4, beta_unshaped, 100) == pytest.approx(1e-4 + 0.08)
    # a step pays only its strategy's extra bytes, and local SGD 1/k of them
    ddp = predict_step_on_link(10.0, {"sync": "ddp"}, 2, beta_unshaped, 1000)
    assert ddp == pytest.approx(10.0 + 1000 * 6e-9 * GRAD_BYTES)
    local = predict_step_on_link(10.0, {"sync": "local_sgd", "local_sgd_every": 8}, 2, beta_unshaped, 1000)
    assert local == pytest.approx(10.0 + 1000 * 6e-9 * GRAD_BYTES / 8)
    fp16 = predict_step_on_link(10.0, {"sync": "fp16"}, 2, beta_unshaped, 1000)
    assert fp16 == pytest.approx(10.0 + 1000 * 6e-9 * strategy_bytes("fp16")[0])


@needs_lab
def test_a_command_that_fails_in_a_node_is_named_and_the_lab_is_removed():
    with pytest.raises(RuntimeError, match=r"node \d of the network lab exited with code"):
        with NetLab(2, 100) as lab:
            assert len(namespaces_of(os.getpid())) == 2
            lab.torchrun(["--no-python", "false"], timeout_s=120)  # every rank exits with 1
    assert namespaces_of(os.getpid()) == []


@needs_lab
def test_the_quick_network_part_runs_torchrun_over_shaped_links_and_leaves_nothing(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ddp_helpers.study", "network", "--quick", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    record = json.loads((tmp_path / "study_network_quick.json").read_text())
    unshaped, shaped = record["runs"]
    assert (unshaped["link"], shaped["link"], shaped["rate_mbit"]) == ("no limit", "1 Gb/s", 1000)
    assert [c["id"] for c in shaped["cases"]] == ["ddp", "local_sgd"]
    for run in record["runs"]:  # the single-process reference is timed in every round, beside the cases
        assert len(run["single_process"]["rounds_ms"]) == run["rounds"] == len(run["cases"][0]["vs_single"]["rounds"])
    assert str(GRAD_BYTES) in shaped["allreduce"]["seconds"]
    assert [p["case"] for p in record["predictions"]["steps"]] == ["ddp", "local_sgd"]
    assert record["environment"]["torch"] and record["method"]["launcher"].startswith("torchrun")
    assert namespaces_of(proc.pid) == []


@needs_lab
def test_the_quick_hierarchical_part_measures_shared_memory_within_two_nodes_against_flat_gloo(tmp_path):
    """2 nodes x 2 ranks: the nodes come from torchrun (GROUP_RANK), never from the host name, which
    the namespaces share."""
    out = subprocess.run([sys.executable, "-m", "ddp_helpers.study", "hierarchical", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = json.loads((tmp_path / "study_hierarchical_quick.json").read_text())["runs"]
    assert run["node_of"] == [0, 0, 1, 1] and set(run["allreduce_ms"]) == {"gloo", "shm"}


@needs_lab
def test_sigterm_removes_the_lab_and_stops_its_processes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ddp_helpers.study", "network", "--quick", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(namespaces_of(proc.pid)) < 2:
        time.sleep(0.2)
    assert len(namespaces_of(proc.pid)) == 2, "the lab was never built"
    while time.monotonic() < deadline and len(torchruns_in(descendants(proc.pid))) < 2:
        time.sleep(0.2)  # until a torchrun runs in each node
    assert len(torchruns_in(descendants(proc.pid))) == 2
    lab_pids = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "interrupted" in err
    assert namespaces_of(proc.pid) == []
    assert no_process_left(lab_pids)


def torchruns_in(pids: list[int]) -> list[int]:
    """Those of the processes that are torchrun agents."""
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"torch.distributed.run" in fh.read():
                    found.append(pid)
        except FileNotFoundError:
            pass
    return found


def test_without_root_the_part_says_why_in_one_line_and_exits_3(monkeypatch, capsys, tmp_path):
    from ddp_helpers.study.__main__ import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["network", "--quick", "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "need root" in err
    assert not list(tmp_path.iterdir())  # no record


@needs_lab
def test_a_node_cut_off_mid_run_is_named_both_sides_and_the_job_goes_on_without_it(tmp_path):
    """torchrun --nnodes 1:2: node 1's link goes down in epoch 2. Node 0's rank names rank 1; node 1's
    rank names the store it lost; both end within the timeout and a minute, and node 0's agent starts
    the job again at the smaller size, from rank 0's checkpoint of epoch 1 (the global batch kept by
    accumulation). torchrun's agent on the cut-off node waits in a store call that never returns (see
    README, On a cluster): the lab stops it, and nothing is left."""
    timeout_s, data = 5, os.environ.get("MNIST_DATA_DIR", "")
    train = ["-m", "ddp_helpers", "train", "--dataset", "synthetic", "--train-subset", "4096", "--test-subset", "256",
             "--epochs", "4", "--dropout", "0", "--no-progress", "--timeout-s", str(timeout_s), "--threads-per-rank",
             "1", "--output-dir", str(tmp_path / "out"), "--run-name", "cut", "--checkpoint-dir", str(tmp_path / "ckpt")]
    elastic = ("--nnodes", "1:2", "--max-restarts", "1")  # overrides the lab's --nnodes 2
    with NetLab(2, None) as lab:
        # last_call_timeout: once one node has joined, wait up to 10 s for the other, so that a node whose
        # agent starts late on a loaded host still joins the first round at world size 2 (with 1 s, node 0
        # can start alone, spend its one restart admitting node 1, and the check below finds no rank)
        agents = lab.start(train, tmp_path, env={"MNIST_DATA_DIR": data}, torchrun_args=elastic,
                           rdzv_conf="last_call_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=2")
        deadline = time.monotonic() + 120
        while not (tmp_path / "ckpt" / "ckpt_epoch0001.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        ranks = descendants(agents[1].pid)
        assert ranks, "node 1 had no rank running"
        lab.cut(1)
        end = time.monotonic() + timeout_s + 60
        while not no_process_left(ranks) and time.monotonic() < end:
            time.sleep(0.2)
        assert no_process_left(ranks), "node 1's rank did not end within the timeout and a minute"
        while agents[0].poll() is None and time.monotonic() < end + 60:
            time.sleep(0.2)
        node0, node1 = ((tmp_path / f"node{i}.log").read_text() for i in range(2))
        assert agents[0].returncode == 0, node0[-3000:]
        everything = descendants(agents[1].pid) + [agents[1].pid]
    assert no_process_left(everything) and namespaces_of(os.getpid()) == []
    assert "rank 1 failed: stopped making progress" in node0 and "rank 0 timed out waiting for it" in node0
    assert "rank 1 lost the job's store" in node1 and "did not answer within" in node1, node1[-3000:]
    record = json.loads((tmp_path / "out" / "cut.json").read_text())
    assert record["config"]["world_size"] == 1 and [row["epoch"] for row in record["epochs"]] == [1, 2, 3, 4]
    assert any("resumed at world size 1 from a checkpoint made at world size 2" in n for n in record["runtime"]["notes"])
