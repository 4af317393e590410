"""The study: its analysis against hand-computed values, its command line, and its records."""

import subprocess
import sys

import pytest
import torch

from ddp_helpers.results import RESULTS_DIR
from ddp_helpers.study.comm import GRAD_BYTES, fit_alpha_beta
from ddp_helpers.study.costmodel import inputs_at, project_speedup, ring_allreduce_s, strategy_bytes
from ddp_helpers.results import median_item
from ddp_helpers.study.tta import decompose, time_to_target


def test_alpha_beta_fit_recovers_known_costs():
    sizes = [2**k for k in range(10, 24)]
    alpha, beta = fit_alpha_beta(sizes, [50e-6 + 1e-9 * s for s in sizes])
    assert alpha == pytest.approx(50e-6, rel=1e-6) and beta == pytest.approx(1e-9, rel=1e-6)


def test_the_median_item_is_one_whole_item_the_lower_middle_of_an_even_count():
    rounds = [{"ms": 9.0, "tag": "a"}, {"ms": 3.0, "tag": "b"}, {"ms": 5.0, "tag": "c"}, {"ms": 7.0, "tag": "d"}]
    assert median_item(rounds, key=lambda r: r["ms"])["tag"] == "c"  # sorted 3 5 7 9: the lower middle is 5
    assert median_item(rounds[:3], key=lambda r: r["ms"])["tag"] == "c"  # 3 5 9
    tied = [{"ms": 4.0, "tag": "first"}, {"ms": 4.0, "tag": "second"}, {"ms": 1.0, "tag": "low"}]
    assert median_item(tied, key=lambda r: r["ms"])["tag"] == "first"  # among equal keys, the first item


def test_bytes_on_the_wire_come_from_the_model():
    assert GRAD_BYTES == 567_434 * 4 == strategy_bytes("ddp")[0] == 2 * strategy_bytes("fp16")[0]
    nbytes, messages = strategy_bytes("powersgd", powersgd_rank=4)
    # biases (512+256+128+10), then P and Q: rank 4 x (outputs + inputs) of each weight matrix
    assert messages == 3 and nbytes == 4 * (906 + 4 * ((512 + 784) + (256 + 512) + (128 + 256) + (10 + 128)))


def test_cost_model_inputs_are_linear_in_the_batch_between_the_measured_ones():
    split = lambda d, c, o: {"data": d, "compute": c, "sync": 0.0, "optimizer": o}  # noqa: E731
    throughput = {"cases": [{"id": "w1_1t_b32", "split_ms": split(0.2, 2.0, 0.5)},
                            {"id": "w1_1t_b128", "split_ms": split(0.5, 6.0, 0.5)},
                            {"id": "pair_b32", "step_ms": 3.0}, {"id": "floor_1t_b32", "step_ms": 2.5},
                            {"id": "pair_b128", "step_ms": 7.0}, {"id": "floor_1t_b128", "step_ms": 5.6}]}
    syncstep = {"probe_step_ms": {"32": 5.4, "128": 10.0}}
    at32, at80 = inputs_at(32, throughput, syncstep), inputs_at(80, throughput, syncstep)
    assert at32["local_ms"] == pytest.approx(2.2) and at32["contention"] == pytest.approx(1.2)
    assert at32["sync_ms"] == pytest.approx(5.4 - 2.7 * 1.2)
    assert at80["local_ms"] == pytest.approx((2.2 + 6.5) / 2)  # half way between 32 and 128


def test_ring_allreduce_model_and_projection():
    assert ring_allreduce_s(1e6, 1, 1e-5, 1e9) == 0
    assert ring_allreduce_s(1e6, 2, 1e-5, 1e9) == pytest.approx(2e-5 + 1e-3)
    df = project_speedup(1e-3, 1e6, [1, 2, 8], {"link": (0.0, 1e9)})
    assert df.speedup.tolist()[0] == 1 and df.speedup.is_monotonic_increasing


def history(rows):
    return [{"epoch": e, "epoch_time_s": seconds, "evals": [{"epoch_fraction": (i + 1) / len(accs),
                                                              "train_time_s": seconds * (i + 1) / len(accs),
                                                              "val_accuracy": a} for i, a in enumerate(accs)]}
            for e, (seconds, accs) in enumerate(rows, start=1)]


def test_time_to_target_uses_the_first_validation_pass_that_reaches_it():
    hist = history([(4.0, [0.90, 0.95, 0.96, 0.97]), (4.0, [0.975, 0.981, 0.979, 0.982])])
    got = time_to_target(hist, 0.98)
    assert got["reached"] and got["epochs_to_target"] == 1.5 and got["seconds_to_target"] == 6.0
    assert not time_to_target(hist, 0.99)["reached"]


def test_time_to_accuracy_ratio_is_the_product_of_its_factors():
    single = {"seconds_to_target": 9.0, "epochs_to_target": 3.5, "steps_per_epoch": 100}
    two = {"seconds_to_target": 8.0, "epochs_to_target": 4.0, "steps_per_epoch": 100,
           "sync_fraction": [0.1] * 4, "epoch_time_s": [2.0] * 4}
    d = decompose(single, two, {"batch_size": 256, "world_size": 1}, {"batch_size": 128, "world_size": 2})
    assert d["ratio"] == pytest.approx(9 / 8) and d["samples"] == pytest.approx(3.5 / 4) and d["sync"] == 0.9
    assert d["samples"] * d["compute"] * d["sync"] == pytest.approx(d["ratio"])


def test_the_study_refuses_a_part_it_does_not_have_and_writes_nothing(tmp_path):
    """A part's quick mode writing its record through this command line is tested with the network
    part (tests/test_network.py), which also runs the all-reduce sweep and its fit."""
    out = subprocess.run([sys.executable, "-m", "ddp_helpers.study", "speed", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice: 'speed'" in out.stderr and not list(tmp_path.iterdir())


@pytest.mark.skipif(not (RESULTS_DIR / "study_throughput.json").exists(), reason="no study records committed")
def test_the_committed_records_are_read_by_the_current_analysis_and_charts():
    import matplotlib
    import matplotlib.pyplot

    matplotlib.use("Agg")
    from ddp_helpers.results import load_json
    from ddp_helpers.study import charts, costmodel

    r = {part: load_json(RESULTS_DIR / f"study_{part}.json") for part in
         ("allreduce", "syncstep", "throughput", "tta", "knobs", "cores")}
    table = costmodel.check_throughput(r["throughput"], r["syncstep"], r["allreduce"])
    assert len(table) >= 9 and table["batch measured"].any() and not table["batch measured"].all()
    assert len(costmodel.check_other_runs(r["tta"], r["throughput"], r["syncstep"], r["allreduce"])) >= 3
    for draw, record in ((charts.plot_allreduce, r["allreduce"]), (charts.plot_predicted_vs_measured, table),
                         (charts.plot_accuracy_vs_time, r["tta"]), (charts.plot_tta_factors, r["tta"]["pairs"]),
                         (charts.plot_knobs, r["knobs"])):
        matplotlib.pyplot.close(draw(record))  # each chart is drawn from the committed record without an error


def test_the_compute_floor_flushes_denormals_while_it_runs_and_only_then():
    from ddp_helpers.study.floors import denormals_flushed
    if not torch.set_flush_denormal(True):  # a CPU without flush-to-zero: nothing to check
        torch.set_flush_denormal(False)
        pytest.skip("this CPU cannot flush denormals")
    torch.set_flush_denormal(False)
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # a denormal float32
    with denormals_flushed():
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0
