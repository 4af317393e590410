"""Synchronisation strategies: each checked against a reference computed another way."""

import pytest
import torch

from ddp_helpers import TrainConfig, launch, run_single_process
from ddp_helpers.engine import evaluate, metrics
from processes import EXACT, max_difference

# float64 and no dropout: every "X equals Y" below holds to 1e-9 on any CPU (in float32,
# sums in another order round differently and Adam amplifies it: 1e-4 was seen)
SMALL = dict(dataset="mnist", device="cpu", train_subset=1024, test_subset=500, epochs=1, dropout=0.0,
             seed=5, timeout_s=60, launch_timeout_s=240, dtype="float64")


def test_accumulating_k_micro_batches_matches_one_batch_k_times_larger(mnist):
    big = run_single_process(TrainConfig(world_size=1, batch_size=32, **SMALL), data=mnist)
    accumulated = run_single_process(TrainConfig(world_size=1, batch_size=8, accumulation_steps=4, **SMALL),
                                     data=mnist)
    assert accumulated.history[0]["optimizer_steps"] == big.history[0]["optimizer_steps"] == 32
    assert max_difference(big.state_dict, accumulated.state_dict) < EXACT


def test_ddp_no_sync_accumulation_matches_one_process_with_the_global_batch(mnist):
    """2 ranks x 2 micro-batches x 8 samples = the same 32 samples as one process's step."""
    reference = run_single_process(TrainConfig(world_size=1, batch_size=32, **SMALL), data=mnist)
    ddp = launch(TrainConfig(world_size=2, batch_size=8, accumulation_steps=2, sync="ddp", **SMALL))
    assert ddp.history[0]["optimizer_steps"] == 32 and ddp.record["runtime"]["global_batch"] == 32
    assert max_difference(reference.state_dict, ddp.state_dict) < EXACT


@pytest.mark.parametrize("sync, extra", [("fp16", {}), ("powersgd", {}), ("local_sgd", {"local_sgd_every": 5}),
                                         ("local_sgd_overlap", {"local_sgd_every": 5})])
def test_each_strategy_trains_a_few_steps_on_two_ranks(sync, extra, mnist):
    cfg = TrainConfig(world_size=2, sync=sync, max_steps_per_epoch=12, **{**SMALL, "dropout": 0.2}, **extra)
    result = launch(cfg)
    row = result.history[0]
    assert result.record["runtime"]["sync"] == sync
    assert row["steps_per_worker"] == 12 and row["step_ms"]["sync"] > 0
    assert 0.3 < row["val_accuracy"] <= 1.0  # 12 steps on real digits: far better than chance
    # the ranks evaluated one and the same model (local SGD averages its 2 pending steps first):
    # rank 0's weights, evaluated alone on the whole test subset, give the reported loss
    test = mnist[1].head(SMALL["test_subset"]).to("cpu", torch.float64)
    alone = metrics(evaluate(result.model(), test, torch.arange(len(test)))["sums"], "val")
    assert alone["val_loss"] == pytest.approx(row["val_loss"], rel=EXACT)


def test_powersgd_trains_on_the_cpu_of_a_machine_that_has_a_gpu():
    """torch's PowerSGD hook synchronises CUDA whenever CUDA is available, with the bucket's
    device; for a CPU bucket that raised "Expected a cuda device, but got: cpu" on every
    GPU machine. Here the workers are made to believe that CUDA is available."""
    from ddp_helpers.workers import run_workers
    from processes import powersgd_with_cuda_available_job

    got = run_workers(powersgd_with_cuda_available_job, 2, launch_timeout_s=120)
    assert got[0]["cuda_available"] and got[0]["steps"] == 6 and got[0]["device"] == "cpu"


def test_evaluating_inside_an_epoch_changes_nothing_but_adds_points(mnist):
    once = run_single_process(TrainConfig(world_size=1, **SMALL), data=mnist)
    four = run_single_process(TrainConfig(world_size=1, evals_per_epoch=4, **SMALL), data=mnist)
    assert max_difference(once.state_dict, four.state_dict) == 0
    evals = four.history[0]["evals"]
    assert [e["epoch_fraction"] for e in evals] == [0.25, 0.5, 0.75, 1.0]
    assert evals[-1]["val_accuracy"] == four.history[0]["val_accuracy"] == once.history[0]["val_accuracy"]
    assert 0 < evals[0]["train_time_s"] < evals[-1]["train_time_s"] <= four.history[0]["epoch_time_s"] + 1e-9


def test_warmup_ramps_the_learning_rate_and_restores_it(mnist):
    cfg = TrainConfig(world_size=1, batch_size=64, warmup_steps=1000, **SMALL)
    warm = run_single_process(cfg, data=mnist)
    cold = run_single_process(cfg.replace(warmup_steps=0), data=mnist)
    assert warm.history[0]["lr"] == cold.history[0]["lr"] == 1e-3   # the scheduler's base rate is kept
    assert warm.history[0]["train_loss"] > cold.history[0]["train_loss"]  # tiny early steps learn less


def test_early_stop_at_target_accuracy(mnist):
    result = run_single_process(TrainConfig(world_size=1, **{**SMALL, "epochs": 5}, stop_at_accuracy=0.5),
                                data=mnist)
    assert len(result.history) == 1 and result.history[0]["val_accuracy"] >= 0.5


def test_overlapped_local_sgd_applies_each_average_one_period_late_and_keeps_local_progress():
    from ddp_helpers.workers import run_workers
    from processes import overlap_local_sgd_job

    got = run_workers(overlap_local_sgd_job, 2, launch_timeout_s=120)
    assert got[0]["unchanged"] == [1.0, 2.0] and got[1]["unchanged"] == [3.0, 6.0]
    assert got[0]["collected"] == [2.5, 4.0] and got[1]["collected"] == [2.0, 3.0]  # mean(a) = [2, 4], plus d_r
    assert got[0]["final"] == got[1]["final"] == [2.25, 3.5]  # mean(a) + mean(d)
