"""What a long run meets and what a user then does: a full disk, a second run on the same files, the
logs people already read (CSV, TensorBoard), and the trained model used afterwards."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest



def train(tmp_path, *flags, timeout=240, **kwargs):
    return subprocess.run([sys.executable, "-m", "ddp_helpers", "train", "--no-progress", "--output-dir",
                           str(tmp_path), "--run-name", "run", *flags], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def test_a_run_reads_as_csv_and_tensorboard_and_its_weights_evaluate_to_its_record(tmp_path):
    """Full test set, so that the record's last validation accuracy is the evaluation's accuracy."""
    out = train(tmp_path, "--world-size", "1", "--train-subset", "2048", "--epochs", "2", "--tensorboard",
                str(tmp_path / "tb"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "run.json").read_text())
    with open(tmp_path / "run.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["val_accuracy"]) for r in rows] == [e["val_accuracy"] for e in record["epochs"]]
    assert float(rows[1]["step_ms_sync"]) == record["epochs"][1]["step_ms"]["sync"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # in requirements.txt

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/accuracy")] == [
        (row["epoch"], pytest.approx(row["val_accuracy"], rel=1e-6)) for row in record["epochs"]]  # stored as float32
    assert [e.value for e in events.Scalars("step_ms/sync")] == [
        pytest.approx(row["step_ms"]["sync"], rel=2**-23) for row in record["epochs"]]
    got = subprocess.run([sys.executable, "-m", "ddp_helpers", "evaluate", str(tmp_path / "run.json")],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith(f"test accuracy {record['summary']['final_val_accuracy']:.2%} on 10,000 images")
    assert "per digit: 0: " in got.stdout and "most confused: " in got.stdout


def test_a_file_that_is_not_ours_is_refused_in_one_line(tmp_path):
    import torch

    for name, write in (("noise.pt", lambda p: torch.save({"w": torch.zeros(3)}, p)),
                        ("notes.json", lambda p: p.write_text('{"kind": "notes"}'))):
        write(tmp_path / name)
        got = subprocess.run([sys.executable, "-m", "ddp_helpers", "evaluate", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=120)
        assert got.returncode == 2 and len(got.stderr.splitlines()) == 1 and "is not" in got.stderr, got.stderr


def test_a_second_run_on_the_same_files_is_refused_and_the_first_keeps_its_history(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "ddp_helpers", "train", "--no-progress", "--world-size", "1",
                              "--dataset", "synthetic", "--train-subset", "512", "--test-subset", "64", "--epochs",
                              "1000", "--output-dir", str(tmp_path), "--run-name", "run"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        journal, deadline = tmp_path / "run.epochs.jsonl", time.monotonic() + 90
        while first.poll() is None and time.monotonic() < deadline and not (journal.exists() and journal.read_text()):
            time.sleep(0.1)  # until the first has written an epoch's row
        second = train(tmp_path, "--world-size", "1", "--dataset", "synthetic", "--train-subset", "512", "--epochs", "1")
        assert second.returncode == 2 and second.stderr.startswith(f"error: another run (process {first.pid}) is "
                                                                   f"writing run.epochs.jsonl"), second.stderr
        assert len(second.stderr.splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    epochs = [json.loads(line)["epoch"] for line in journal.read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))  # one run's rows, in order
    assert not (tmp_path / "run.epochs.jsonl.lock").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB file system (tmpfs): room for one checkpoint of a small model, not two."""
    folder = tmp_path / "disk"
    folder.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_is_said_in_one_line_with_what_was_kept_and_how_to_resume(tmp_path, small_disk):
    """A checkpoint of the 64-unit MLP with Adam's state is about 0.6 MB: epoch 1's fits, epoch 2's does not.
    torch's own message would be 'unexpected pos ...' from its zip writer, with a traceback per rank."""
    out = train(tmp_path, "--world-size", "2", "--hidden-sizes", "64", "--dataset", "synthetic", "--train-subset",
                "512", "--test-subset", "64", "--epochs", "3", "--checkpoint-dir", str(small_disk))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert f"no space left on the device of {small_disk} while writing the checkpoint ckpt_epoch0002.pt" in line
    assert f"last checkpoint {small_disk / 'ckpt_epoch0001.pt'} (epoch 1)" in line and "--resume" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["ckpt_epoch0001.pt"]  # kept, and no half-written file
    import torch

    assert torch.load(small_disk / "ckpt_epoch0001.pt", weights_only=True)["epoch"] == 1
