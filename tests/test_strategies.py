"""Synchronisation strategies: each checked against a reference computed another way."""

import json
import subprocess
import sys

import pytest
import torch

from ddp_helpers import TrainConfig, launch, run_single_process
from ddp_helpers.engine import evaluate
from ddp_helpers.costmodel import AlphaBeta, project_speedup, ring_allreduce_s, tta_ratios
from processes import max_difference

SMALL = dict(dataset="mnist", train_subset=1024, test_subset=500, epochs=1, dropout=0.0, seed=5,
             timeout_s=60, launch_timeout_s=240)


def test_accumulating_k_micro_batches_matches_one_batch_k_times_larger(mnist):
    big = run_single_process(TrainConfig(world_size=1, batch_size=32, **SMALL), data=mnist)
    accumulated = run_single_process(TrainConfig(world_size=1, batch_size=8, accumulation_steps=4, **SMALL),
                                     data=mnist)
    assert accumulated.history[0]["optimizer_steps"] == big.history[0]["optimizer_steps"] == 32
    assert max_difference(big.state_dict, accumulated.state_dict) < 1e-5


def test_ddp_no_sync_accumulation_matches_one_process_with_the_global_batch(mnist):
    """2 ranks x 2 micro-batches x 8 samples = the same 32 samples as one process's step."""
    reference = run_single_process(TrainConfig(world_size=1, batch_size=32, **SMALL), data=mnist)
    ddp = launch(TrainConfig(world_size=2, batch_size=8, accumulation_steps=2, sync="ddp", **SMALL))
    assert ddp.history[0]["optimizer_steps"] == 32 and ddp.record["runtime"]["global_batch"] == 32
    assert max_difference(reference.state_dict, ddp.state_dict) < 1e-4


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
    test = mnist[1].head(SMALL["test_subset"])
    alone = evaluate(result.model(), test, torch.arange(len(test)))
    assert alone["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5)


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


def test_alpha_beta_fit_recovers_known_costs():
    sizes = [2**k for k in range(10, 24)]
    ab = AlphaBeta.fit(sizes, [50e-6 + 1e-9 * s for s in sizes])
    assert ab.alpha_s == pytest.approx(50e-6, rel=1e-6) and ab.beta_s_per_byte == pytest.approx(1e-9, rel=1e-6)


def test_ring_allreduce_model_and_projection():
    assert ring_allreduce_s(1e6, 1, 1e-5, 1e9) == 0
    # 2 ranks: 2 hops of latency, and each rank sends and receives half the data twice
    assert ring_allreduce_s(1e6, 2, 1e-5, 1e9) == pytest.approx(2e-5 + 1e-3)
    df = project_speedup(1e-3, 1e6, [1, 2, 8], {"link": (0.0, 1e9)})
    assert df.speedup.tolist()[0] == 1 and df.speedup.is_monotonic_increasing


def test_tta_ratios_pick_the_best_of_each_kind():
    def s(name, w, t, secs, reached=3):
        return {"name": name, "config": {"world_size": w, "threads_per_rank": t}, "reached": reached,
                "seeds": 3, "seconds_mean": secs}
    record = {"summary": [s("a", 1, 1, 30.0), s("b", 1, 2, 20.0), s("c", 2, 0, 10.0), s("d", 2, 0, 5.0, reached=2)]}
    ratios = tta_ratios(record)
    assert ratios["best_2_workers"] == "c" and ratios["speedup_vs_1_thread"] == 3 and ratios["speedup_vs_2_threads"] == 2


def test_benchmark_quick_mode_writes_valid_records(tmp_path):
    for part in ("allreduce", "syncstep", "throughput", "vcpu", "cores"):
        out = subprocess.run([sys.executable, "-m", "ddp_helpers.bench", part, "--quick", "--out", str(tmp_path)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    allreduce = json.loads((tmp_path / "bench_allreduce_quick.json").read_text())
    assert set(allreduce["world_sizes"]) == {"2", "4"} and allreduce["environment"]["torch"]
    throughput = json.loads((tmp_path / "bench_throughput_quick.json").read_text())
    names = [c["name"] for c in throughput["cases"]]
    assert "seed-style reference, W=2" in names and "DDP W=2, b32" in names
    assert all(c["step_ms_median"] > 0 and c["epoch_s_projected"] > 0 for c in throughput["cases"])
    assert {"ours_W2_vs_seed_style", "loop_vs_compute_floor_W1"} <= set(throughput["targets"])
    assert (tmp_path / "bench_throughput_quick.md").read_text().startswith("| configuration")
    syncstep = json.loads((tmp_path / "bench_syncstep_quick.json").read_text())
    assert [row["batch"] for row in syncstep["rows"]] == [32, 128] and all(r["step_ms"] > 0 for r in syncstep["rows"])
    vcpu = json.loads((tmp_path / "bench_vcpu_quick.json").read_text())
    together = vcpu["rounds"][0]["together_relative"]
    assert len(together) >= 16 and all(r > 0 for r in together) and 0 <= vcpu["together_share_below_0_85"] <= 1
    cores = json.loads((tmp_path / "bench_cores_quick.json").read_text())
    assert [row["batch"] for row in cores["rows"]] == [32, 128, 256]
    for row in cores["rows"]:  # every slot measured; the pair is never faster than one process alone
        assert row["alone_ms"] > 0 and row["one_process_2_threads_double_batch_ms"] > 0
        assert row["two_at_once_ms"] >= 0.8 * row["alone_ms"]


def test_time_to_target_uses_the_first_validation_pass_that_reaches_it():
    from ddp_helpers.bench import time_to_target

    def row(epoch, seconds, accs):
        n = len(accs)
        return {"epoch": epoch, "epoch_time_s": seconds, "val_accuracy": accs[-1],
                "evals": [{"epoch_fraction": (i + 1) / n, "train_time_s": seconds * (i + 1) / n, "val_accuracy": a}
                          for i, a in enumerate(accs)]}
    history = [row(1, 4.0, [0.90, 0.95, 0.96, 0.97]), row(2, 4.0, [0.975, 0.981, 0.979, 0.982])]
    got = time_to_target(history, 0.98)
    assert got["reached"] and got["epochs_to_target"] == 1.5 and got["seconds_to_target"] == 6.0
    assert got["epochs_to_target_at_epoch_end"] == 2 and got["seconds_to_target_at_epoch_end"] == 8.0
    assert not time_to_target(history, 0.99)["reached"]


def test_two_worker_ceiling_compares_the_same_samples_per_step():
    from ddp_helpers.costmodel import two_worker_ceiling

    cores = {"rows": [{"batch": 128, "alone_ms": 7.0, "two_at_once_ms": 8.0, "one_process_2_threads_double_batch_ms": 10.0},
                      {"batch": 256, "alone_ms": 14.0, "two_at_once_ms": 15.0, "one_process_2_threads_double_batch_ms": 20.0}]}
    c = two_worker_ceiling(cores, 128)
    assert c["ceiling_vs_2_threads"] == 10 / 8 and c["ceiling_vs_1_thread"] == 14 / 8


def test_tta_decomposition_factors_multiply_to_the_measured_ratio():
    from ddp_helpers.costmodel import tta_decomposition

    def summary(name, w, t, b, secs):
        return {"name": name, "config": {"world_size": w, "threads_per_rank": t, "batch_size": b,
                                         "accumulation_steps": 1}, "reached": 1, "seeds": 1, "seconds_mean": secs}

    def run(secs, epochs, sync_fraction):
        return {"seed": 0, "seconds_to_target": secs, "epochs_to_target": epochs, "steps_per_epoch": 100,
                "epoch_time_s": [secs / epochs] * 4, "sync_fraction": [sync_fraction] * 4}
    record = {"summary": [summary("pair", 2, 1, 128, 8.0), summary("threads", 1, 2, 256, 9.0)],
              "runs": {"pair": [run(8.0, 4.0, 0.1)], "threads": [run(9.0, 3.5, 0.0)]},
              "headroom": {"0": [{"pair_ms": {"128": 20.0}, "two_threads_ms": {"256": 24.0}},
                                 {"pair_ms": {"128": 20.0}, "two_threads_ms": {"256": 26.0}}]}}
    d = tta_decomposition(record, target_ratio=1.2)
    row = d["seeds"][0]
    assert d["applies"] and row["ratio"] == pytest.approx(9.0 / 8.0)
    assert row["samples"] == pytest.approx(3.5 / 4.0) and row["headroom"] == pytest.approx(25.0 / 20.0)
    assert row["sync"] == pytest.approx(0.9) and row["sync_ms_per_step"] == pytest.approx(2.0)
    assert row["samples"] * row["headroom"] * row["loop"] * row["sync"] == pytest.approx(row["ratio"])
    assert row["samples"] * row["compute_ratio"] * row["sync"] == pytest.approx(row["ratio"])
    assert row["needed_compute_ratio"] == pytest.approx(1.2 * row["compute_ratio"] / row["ratio"])
    # the two sides may use different global batches: the factors are per sample
    record["summary"][1]["config"]["batch_size"] = 512
    record["runs"]["threads"][0]["steps_per_epoch"] = 50
    for h in record["headroom"]["0"]:
        h["two_threads_ms"]["512"] = 2 * h["two_threads_ms"]["256"]
    same = tta_decomposition(record)["seeds"][0]
    assert same["samples"] == pytest.approx(row["samples"]) and same["headroom"] == pytest.approx(row["headroom"])
    del record["headroom"]["0"][0]["pair_ms"]["128"]  # not measured at the batch used: not comparable
    assert not tta_decomposition(record)["applies"]


def test_overlapped_local_sgd_applies_each_average_one_period_late_and_keeps_local_progress():
    from ddp_helpers.launch import run_workers
    from processes import overlap_local_sgd_job

    got = run_workers(overlap_local_sgd_job, 2, launch_timeout_s=120)
    assert got[0]["unchanged"] == [1.0, 2.0] and got[1]["unchanged"] == [3.0, 6.0]
    assert got[0]["collected"] == [2.5, 4.0] and got[1]["collected"] == [2.0, 3.0]  # mean(a) = [2, 4], plus d_r
    assert got[0]["final"] == got[1]["final"] == [2.25, 3.5]  # mean(a) + mean(d)
