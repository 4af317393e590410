"""On a cluster: SLURM's variables read like torchrun's, the README's sbatch script run with a
stand-in for srun, and a scheduler's SIGTERM to the CLI."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddp_helpers.checkpoint import list_checkpoints
from ddp_helpers.dist import find_free_port
from ddp_helpers.place import first_host, launcher_place, tasks_per_node
from processes import no_process_left, processes_with, spawned_workers_of

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE", "RANK",
                      "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# task 3 of 4, on the second of two nodes with two tasks each
SRUN_TASK = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_STEP_ID": "7", "SLURM_STEP_NUM_TASKS": "4",
             "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "node[01-02]"}
# what sbatch gives the batch script itself: a job, but no step
BATCH_SCRIPT = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                "SLURM_NODEID": "0", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
                "SLURM_JOB_NODELIST": "node[01-02]"}


def without_launchers(environ) -> dict:
    """The environment with no variable of torchrun or SLURM (the tests may run under either)."""
    return {k: v for k, v in environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}


@pytest.fixture
def launched(monkeypatch):
    """Set launcher variables for one test, starting from none."""
    for key in set(os.environ) - set(without_launchers(os.environ)):
        monkeypatch.delenv(key)

    def set_variables(variables: dict) -> None:
        for key, value in variables.items():
            monkeypatch.setenv(key, value)
    return set_variables


def run_group(cmd, timeout, **kwargs) -> subprocess.CompletedProcess:
    """Run a command in its own process group; whatever of the group is left afterwards is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


# --- SLURM's variables ----------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, first", [
    ("node[01-04,07],gpu5", "node01"), ("a,b", "a"), ("host", "host"), ("node[7]", "node7"),
    ("gpu[12,3-4]", "gpu12"), ("rack[2-3]-n[5-6]", "rack2-n5"), ("h0 h1", "h0"),
])
def test_the_first_host_of_a_slurm_nodelist(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "node[01-04", "[01]]x"])
def test_a_nodelist_that_is_not_one_is_refused_with_a_fix(nodelist):
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST=.*Fix:"):
        first_host(nodelist)


@pytest.mark.parametrize("spec, counts", [("2(x3)", [2, 2, 2]), ("2,1", [2, 1]), ("4(x2),3", [4, 4, 3]), ("8", [8])])
def test_tasks_per_node_expands_slurms_compressed_counts(spec, counts):
    assert tasks_per_node(spec) == counts


def test_a_task_of_an_srun_step_is_read_like_lightning(launched):
    launched(SRUN_TASK)
    env = launcher_place()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port) == ("node01", 15000 + 3456)  # the job id's last four digits
    assert (env.run_id, env.attempt, env.launcher) == ("slurm-123456-7", 0, "slurm")


def test_master_addr_and_port_from_the_environment_win_under_srun(launched):
    launched({**SRUN_TASK, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29511"})
    env = launcher_place()
    assert (env.master_addr, env.master_port, env.launcher) == ("10.0.0.9", 29511, "slurm")


def test_torchrun_variables_win_over_slurms(launched):
    """``srun torchrun ...``: the ranks are torchrun's workers, in a step of one task per node."""
    launched({**SRUN_TASK, "TORCHELASTIC_RUN_ID": "job", "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
              "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node01", "MASTER_PORT": "29500"})
    env = launcher_place()
    assert (env.rank, env.world_size, env.local_world_size, env.launcher) == (5, 8, 4, "torchrun")


def test_a_batch_script_is_no_step_and_spawns_as_usual(launched):
    launched(BATCH_SCRIPT)
    assert launcher_place() is None


def test_a_step_of_one_task_spawns_as_usual(launched):
    launched({**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
              "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_STEP_NODELIST": "node01"})
    assert launcher_place() is None


def test_a_broken_slurm_variable_is_reported_without_a_traceback():
    env = {**without_launchers(os.environ), **SRUN_TASK, "SLURM_STEP_TASKS_PER_NODE": "two"}
    out = subprocess.run([sys.executable, "-m", "ddp_helpers", "train", "--print-config"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: SLURM_STEP_TASKS_PER_NODE='two'" in out.stderr and "Fix:" in out.stderr


# --- the README's sbatch script --------------------------------------------------------------------

FAKE_SRUN = """#!/usr/bin/env bash
# srun on one node named localhost: $SLURM_NTASKS copies of the command, with the variables srun sets
while [[ $1 == -* ]]; do shift; done  # its options (written --name=value)
export SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=$SLURM_NTASKS SLURM_STEP_TASKS_PER_NODE=$SLURM_NTASKS \\
       SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 SLURM_NODEID=0
pids=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
    SLURM_PROCID=$task SLURM_LOCALID=$task "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def readme_sbatch_script() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- sbatch:begin -->\s*```bash\n(.*?)```\s*<!-- sbatch:end -->", text, re.S)
    assert found, "README.md has no ```bash block between <!-- sbatch:begin --> and <!-- sbatch:end -->"
    return found.group(1)


def test_the_readme_sbatch_script_runs_one_job_of_two_ranks(tmp_path):
    bin_dir, out_dir = tmp_path / "bin", tmp_path / "results"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "train.sbatch"
    script.write_text(readme_sbatch_script())
    env = {**without_launchers(os.environ), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_TASKS_PER_NODE": "2", "SLURM_SUBMIT_DIR": str(ROOT),
           "MASTER_PORT": str(find_free_port()), "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "PYTHONUNBUFFERED": "1"}
    out = run_group(["bash", str(script), "--dataset", "synthetic", "--train-subset", "512", "--test-subset", "64",
                     "--epochs", "1", "--output-dir", str(out_dir)], timeout=240, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = list(out_dir.glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["runtime"]["rank_count"] == 2 and record["config"]["world_size"] == 2
    # one job of the two tasks: one first line, from rank 0, and nobody spawned workers of their own
    assert out.stdout.count("training: world_size=2 (slurm (srun))") == 1 and "spawned" not in out.stdout
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["ckpt_epoch0001.pt"]


def test_the_scheduler_s_warning_stops_the_job_at_one_step_and_the_requeued_job_finishes_it(tmp_path):
    """--signal=USR1@90: SIGUSR1 reaches every task of the step (here from the test, as from slurmd). The
    two ranks agree on one step, rank 0 checkpoints there, both exit with 75, the script asks for a
    requeue, and the job started again (same id) resumes within the epoch and finishes."""
    bin_dir, out_dir = tmp_path / "bin", tmp_path / "results"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "train.sbatch"
    script.write_text(readme_sbatch_script())
    env = {**without_launchers(os.environ), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "4243", "SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_TASKS_PER_NODE": "2", "SLURM_SUBMIT_DIR": str(ROOT),
           "MASTER_PORT": str(find_free_port()), "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "PYTHONUNBUFFERED": "1",
           "EPOCHS": "2"}
    command = ["bash", str(script), "--dataset", "synthetic", "--train-subset", "16384", "--test-subset", "64",
               "--output-dir", str(out_dir), "--run-name", "run"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None and not list_checkpoints(tmp_path / "ckpt"):
            time.sleep(0.1)  # until epoch 1's checkpoint: the ranks are in epoch 2
        tasks = [pid for pid in processes_with("ddp_helpers train") if pid != first.pid and is_python(pid)]
        assert len(tasks) == 2, tasks
        for pid in tasks:
            os.kill(pid, signal.SIGUSR1)
        out, err = first.communicate(timeout=120)
    finally:
        kill_group(first)
    assert first.returncode == 75, out[-3000:] + err[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4243"]
    stopped = [p.name for p in list_checkpoints(tmp_path / "ckpt")]
    assert stopped[0].startswith("ckpt_epoch0001_step"), stopped  # within epoch 2, where the ranks agreed
    assert out.count("stopped as asked (the scheduler's SIGUSR1) at epoch 2") == 1
    again = run_group(command, timeout=240, cwd=ROOT, env=env)  # the requeued job: the same id and folder
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    record = json.loads((out_dir / "run.json").read_text())
    assert record["status"] == "ok" and [row["epoch"] for row in record["epochs"]] == [1, 2]
    assert any(note.startswith("resumed from") and "step" in note for note in record["runtime"]["notes"])


def is_python(pid: int) -> bool:
    """Whether a process is a Python interpreter (a task), not the shell or srun around it."""
    try:
        return "python" in Path(f"/proc/{pid}/exe").resolve().name
    except OSError:
        return False


# --- a scheduler's SIGTERM to the CLI ----------------------------------------------------------------

def test_sigterm_stops_the_workers_and_the_run_resumes_from_its_checkpoint(tmp_path):
    ckpt, temp = tmp_path / "ckpt", tmp_path / "tmp"
    temp.mkdir()
    cmd = [sys.executable, "-m", "ddp_helpers", "train", "--world-size", "2", "--dataset", "synthetic",
           "--train-subset", "8192", "--test-subset", "256", "--epochs", "3", "--checkpoint-dir", str(ckpt),
           "--no-progress", "--output-dir", str(tmp_path), "--run-name", "stopped"]
    env = {**without_launchers(os.environ), "TMPDIR": str(temp)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(ckpt) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list_checkpoints(ckpt) and proc.poll() is None, "no checkpoint while the run was going"
        workers = spawned_workers_of(proc.pid)
        assert len(workers) == 2 and list(temp.glob("ddp_run_*"))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    newest = list_checkpoints(ckpt)[0]
    assert proc.returncode == 143, err[-3000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1 and "all workers were stopped (2 ranks)" in stopped[0]
    assert str(newest) in stopped[0] and "--resume" in stopped[0]
    assert no_process_left(workers)
    assert not list(temp.glob("ddp_run_*"))

    resumed = run_group([*cmd, "--resume"], timeout=240, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    record = json.loads((tmp_path / "stopped.json").read_text())
    assert [row["epoch"] for row in record["epochs"]] == [1, 2, 3]
    assert any("resumed from" in note for note in record["runtime"]["notes"])


def test_the_stop_line_says_when_no_checkpoint_was_kept():
    from ddp_helpers.cli import stopped_line
    from ddp_helpers.config import TrainConfig

    line = stopped_line("SIGTERM", TrainConfig(world_size=2), None, ["train"])
    assert line == ("stopped by SIGTERM: all workers were stopped (2 ranks); "
                    "no checkpoint was kept (pass --checkpoint-dir to keep them)")


def test_main_restores_the_sigterm_handler(capsys):
    from ddp_helpers.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "--dataset", "synthetic", "--print-config"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


# --- the attempt, agreed in the store -----------------------------------------------------------------------

def test_the_ranks_of_an_attempt_agree_on_it_though_their_restart_counts_differ():
    """pytorch/pytorch issue 108158: on a membership change torchrun restarts a healthy node's workers
    without counting a restart. Here the second attempt's rank 0 (restarted node) holds count 1 and
    rank 1 (the other node) still 0, and rank 1 asks before rank 0 has opened the attempt: both agree
    on attempt 1, and nothing of attempt 0 (a failure it recorded) is visible under attempt 1's keys."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from ddp_helpers.dist import agree_attempt, find_free_port
    from ddp_helpers.place import RankPlace

    store = dist.TCPStore("127.0.0.1", find_free_port(), is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=30))  # as torchrun's agent keeps it across attempts

    def attempt_of(rank, got):  # each rank with a client of its own, as each process has
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=30))
        got[rank] = agree_attempt(client, "ddp_helpers/job", rank, 2, timeout_s=30)

    first: dict = {}
    threads = [threading.Thread(target=attempt_of, args=(r, first)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    place = RankPlace(1, 2, 0, 1, 1, first[1], "job", "127.0.0.1", store.port)
    dist.PrefixStore(place.store_prefix, store).set("failed/1", "attempt 0's failure")

    second: dict = {}
    late_rank_0 = threading.Thread(target=attempt_of, args=(0, second))
    early_rank_1 = threading.Thread(target=attempt_of, args=(1, second))
    old_question = store.get("ddp_helpers/job/ask/1")
    early_rank_1.start()
    while store.get("ddp_helpers/job/ask/1") == old_question:
        time.sleep(0.01)  # until rank 1 has asked anew: rank 0 opens the attempt only after that
    late_rank_0.start()
    for t in (late_rank_0, early_rank_1):
        t.join(60)
    assert first == {0: 0, 1: 0} and second == {0: 1, 1: 1}
    assert not dist.PrefixStore(place.with_attempt(second[1]).store_prefix, store).check(["failed/1"])
