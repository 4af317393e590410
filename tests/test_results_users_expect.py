"""Results users expect: a run whose loss diverged fails and says where, its record marked
failed; a run that finished keeps its trained model beside its record."""

import json
import re
import subprocess
import sys

import pytest
import torch

from ddp_helpers import MLP, TrainConfig, launch, load_datasets
from ddp_helpers.checkpoint import list_checkpoints
from ddp_helpers.dist import RankContext
from ddp_helpers.engine import NonFiniteLossError, Tally
from ddp_helpers.host import peak_rss_mib
from ddp_helpers.trainer import LossWatch

TINY = dict(dataset="synthetic", device="cpu", train_subset=512, test_subset=64, threads_per_rank=1)
# lr=1e30: step 0 runs on the initial weights (a finite loss); its Adam step makes every weight about
# 1e30, and the next forward pass overflows float32. With one step per epoch (64 samples: one rank of
# 64 or two of 32), epoch 1 ends finite and writes its checkpoint, and epoch 2's only step diverges.
DIVERGES_IN_EPOCH_2 = dict(lr=1e30, train_subset=64, epochs=3)


def train_cli(tmp_path, world_size, timeout=180, **values):
    """``python -m ddp_helpers train`` with TINY and these values, its record named run.json."""
    values = {**TINY, "batch_size": 64 // world_size, "world_size": world_size, **values}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in values.items()]
    return subprocess.run([sys.executable, "-m", "ddp_helpers", "train", *flags, "--no-progress",
                           f"--output-dir={tmp_path}", "--run-name=run"],
                          capture_output=True, text=True, timeout=timeout)


def test_a_loss_that_is_not_finite_stops_one_process_at_that_step():
    events = []
    with pytest.raises(NonFiniteLossError, match=r"not finite \(NaN or inf\) at epoch 1, global step 1\. Fix: "):
        launch(TrainConfig(world_size=1, lr=1e30, epochs=2, **TINY), on_event=events.append, live=False)
    assert [e for e in events if e.kind == "epoch"] == []


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_run_that_diverges_fails_with_a_failed_record_and_keeps_its_checkpoint(tmp_path, world_size):
    out = train_cli(tmp_path, world_size, checkpoint_dir=tmp_path / "ckpt", **DIVERGES_IN_EPOCH_2)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    error = next(line for line in out.stderr.splitlines() if line.startswith("error: "))
    where = r"the training loss was not finite \(NaN or inf\) at epoch 2, global step 1"
    if world_size == 1:
        assert re.fullmatch(f"error: {where}\\. Fix: lower the learning rate .*", error), error
    else:  # the ranks stopped together, and the parent names the rank whose loss it was (a tie: the lowest)
        assert re.fullmatch(f"error: rank 0 failed: NonFiniteLossError: {where} on rank 0; every rank stopped at "
                            f"the evaluation point after step 1\\. Fix: .*", error), error
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "failed" and "epoch 2, global step 1" in record["error"]
    assert [row["epoch"] for row in record["epochs"]] == [1] and "summary" not in record
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["ckpt_epoch0001.pt"]
    assert not (tmp_path / "run.pt").exists()  # no weights for a failed run
    assert "record of the failed run written to" in out.stdout


def test_on_cuda_the_loss_is_read_from_the_tally_once_per_evaluation_point():
    """No GPU needed: that path never reads a step's loss, only the tally's sum."""
    watch = LossWatch(RankContext(0, 1, "none", torch.device("cuda"), 1), lr=1e-3)
    assert watch.step_check(epoch=1) is None
    tally, logits, labels = Tally(torch.device("cpu")), torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)
    tally.add(torch.tensor(2.3), logits, labels)
    watch.at_eval_point(tally, epoch=1, last_step=7)  # finite: nothing happens
    tally.add(torch.tensor(float("inf")), logits, labels)
    with pytest.raises(NonFiniteLossError, match=r"at epoch 2, by global step 15 \(the last step checked"):
        watch.at_eval_point(tally, epoch=2, last_step=15)


def test_the_cli_keeps_the_trained_model_beside_the_record(tmp_path):
    out = train_cli(tmp_path, 1, epochs=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"final weights written to {tmp_path / 'run.pt'}" in out.stdout
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "ok"
    cfg = TrainConfig.from_dict(record["config"])
    model = MLP(cfg.hidden_sizes, cfg.dropout)
    model.load_state_dict(torch.load(tmp_path / "run.pt", weights_only=True))
    _, test = load_datasets(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, cfg.seed)
    with torch.no_grad():  # one batch of 64 in eval mode, as the run's evaluation did: the same argmax
        correct = (model.eval()(test.images).argmax(1) == test.labels).sum().item()
    assert correct / len(test.labels) == record["summary"]["final_val_accuracy"]


def test_the_phases_add_up_to_the_step(monkeypatch):
    """Every "sync is X% of the step" rests on this: the phase laps cover the timed steps, all but
    the clock reads around each part of an epoch. A clock that ticks once per read makes it exact."""
    import itertools
    import time

    from ddp_helpers.engine import PHASES

    clock = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    cfg = TrainConfig(world_size=1, dataset="synthetic", train_subset=256, test_subset=64, epochs=1,
                      evals_per_epoch=2)
    row = launch(cfg, live=False).history[0]
    ticks = {name: round(ms * row["steps_per_worker"] / 1000) for name, ms in row["step_ms"].items()}
    outside = ticks["total"] - sum(ticks[p] for p in PHASES)
    assert sum(ticks[p] for p in PHASES) > 5 * row["steps_per_worker"]  # every step's laps were counted
    assert 0 <= outside <= 2 * cfg.evals_per_epoch, ticks


def test_each_rank_records_its_own_peak_memory_not_its_parents():
    """A worker started by (v)fork and exec inherits its parent's ``ru_maxrss``: with that, every rank
    of a run launched from a big process (a notebook kernel) reported the parent's peak. Here the
    parent holds 1 GB more than any small rank needs, and each rank's figure must stay well below it."""
    ballast = torch.ones(2**28)  # 1 GiB of float32, touched, so resident
    parent = peak_rss_mib()
    result = launch(TrainConfig(world_size=2, epochs=1, **TINY), live=False)
    peaks = result.record["runtime"]["peak_rss_mib_per_rank"]
    assert len(peaks) == 2 and all(0 < mb < parent - 512 for mb in peaks), (peaks, parent)
    del ballast
