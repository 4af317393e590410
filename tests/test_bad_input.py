"""Bad input: numbers that are not finite, a script without the main guard, a worker that cannot
start, and a run stopped while it sets up. Each is refused or reported in one line that says
what to fix, and leaves no process and no run folder behind."""

import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import types

import pytest

from ddp_helpers import TrainConfig, WorkerError
from ddp_helpers.config import config_fields, field_default
from ddp_helpers.workers import run_workers
from processes import killed_by_sigkill_job, no_process_left, processes_in_session

FLOAT_FIELDS = [f.name for f in config_fields() if type(field_default(f)) is float]


def test_the_float_fields_are_the_ones_we_mean():
    assert {"lr", "weight_decay", "dropout", "lr_gamma", "bucket_cap_mb", "timeout_s", "launch_timeout_s",
            "stop_at_accuracy"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_every_float_field_refuses_numbers_that_are_not_finite(field, value):
    """'inf > 0' holds, so inf passed the range checks of lr, timeout_s and the like."""
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value})
    message = str(info.value)
    assert message.startswith(f"TrainConfig.{field}={value!r} is invalid: must be a finite number")
    assert "\n" not in message


@pytest.mark.parametrize("flag, value, field", [("--lr", "inf", "lr"), ("--timeout-s", "nan", "timeout_s")])
def test_the_cli_refuses_them_in_one_line(flag, value, field):
    out = subprocess.run([sys.executable, "-m", "ddp_helpers", "train", flag, value], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [f"error: TrainConfig.{field}={value} is invalid: must be a finite number > 0"]


UNGUARDED_SCRIPT = """\
import ddp_helpers
from ddp_helpers import TrainConfig

# no `if __name__ == "__main__":` around the call: spawn runs this file again in every worker
ddp_helpers.launch(TrainConfig(world_size=2, dataset="synthetic", train_subset=256, test_subset=64, epochs=1))
"""


def test_a_script_without_the_main_guard_is_told_how_to_fix_it(tmp_path):
    """Each worker runs the script again, and its launch() meets multiprocessing's bootstrapping
    error; the parent used to say only 'exited with code 1 without a Python exception'."""
    script, temp = tmp_path / "unguarded.py", tmp_path / "tmp"
    script.write_text(UNGUARDED_SCRIPT)
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TMPDIR": str(temp)}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
        deadline = time.monotonic() + 10  # the resource tracker ends once it sees the script gone
        while processes_in_session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = processes_in_session(proc.pid)
    finally:
        for pid in processes_in_session(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert "failed: the process could not start" in err and "bootstrapping" in err
    assert 'Fix: put the call that starts the run under `if __name__ == "__main__":`' in err
    assert left == []
    assert not list(temp.glob("ddp_run_*"))  # neither the script's run folder nor its workers' own


def test_a_worker_that_fails_before_our_code_runs_is_reported_with_its_error(monkeypatch, capfd):
    """The job's module exists only in this process: each worker fails while it unpickles the job,
    before any code of ours runs in it. quiet=False (the CLI's mode) shows the output here too."""
    jobs = types.ModuleType("jobs_only_in_the_parent")
    exec("def job(place, emit):\n    pass\n", jobs.__dict__)
    monkeypatch.setitem(sys.modules, jobs.__name__, jobs)
    with pytest.raises(WorkerError) as info:
        run_workers(jobs.job, 2, launch_timeout_s=120, quiet=False)
    missing = "No module named 'jobs_only_in_the_parent'"
    assert "while starting, before the job ran" in str(info.value) and missing in str(info.value)
    assert missing in capfd.readouterr().err
    assert no_process_left(info.value.pids)


def test_a_run_stopped_while_it_sets_up_leaves_no_run_folder(monkeypatch, tmp_path):
    """Ctrl-C after the run folder is made but before a worker starts (here: while the pipes are
    made) used to leave the folder behind."""
    import multiprocessing.connection

    def interrupted(duplex=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(multiprocessing.connection, "Pipe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_workers(killed_by_sigkill_job, 2, launch_timeout_s=60)
    assert list(tmp_path.iterdir()) == []
