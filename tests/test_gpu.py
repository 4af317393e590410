"""The CUDA path. Skipped where there is no GPU (CI never has one); run on a lent GPU machine."""

import pytest
import torch

from ddp_helpers import TrainConfig, launch
from processes import EXACT, max_difference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
EXACT_CONFIG = dict(dropout=0.0, dtype="float64", device="cuda", lr_step=1)


@cuda
@pytest.mark.parametrize("train_subset", [2048, 1000])  # 1000: each epoch ends with a short batch, run eagerly
def test_the_captured_step_computes_what_the_eager_step_computes(mnist, train_subset):
    cfg = TrainConfig(world_size=1, epochs=2, train_subset=train_subset, test_subset=500, **EXACT_CONFIG)
    graphed = launch(cfg, data=mnist, live=False)
    eager = launch(cfg.replace(cuda_graph=False), data=mnist, live=False)
    assert graphed.record["runtime"]["cuda_graph"] and not eager.record["runtime"]["cuda_graph"]
    assert max_difference(graphed.state_dict, eager.state_dict) < EXACT
    for a, b in zip(graphed.history, eager.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=EXACT) and a["lr"] == b["lr"]


@cuda
def test_the_default_run_on_a_gpu_captures_its_step_and_learns(mnist):
    result = launch(TrainConfig(world_size=1, epochs=1, train_subset=8192, test_subset=1000),
                                data=mnist, live=False)
    rt = result.record["runtime"]
    assert rt["device"].startswith("cuda") and rt["cuda_graph"] and rt["optimizer"] == "Adam (fused, capturable)"
    assert result.history[-1]["val_accuracy"] > 0.5  # far better than chance after one short epoch
    assert result.record["environment"]["gpus"] and result.record["environment"]["cuda"]


@cuda
def test_two_ranks_share_one_gpu_over_gloo():
    result = launch(TrainConfig(world_size=2, backend="gloo", device="cuda", dataset="synthetic", train_subset=1024,
                                test_subset=128, epochs=1, timeout_s=60, launch_timeout_s=240), live=False)
    rt = result.record["runtime"]
    assert (rt["backend"], rt["device"], rt["cuda_graph"]) == ("gloo", "cuda:0", False)


@cuda
def test_a_resumed_graphed_run_continues_exactly(mnist, tmp_path):
    """The graph's warm-up must put back the restored Adam state and RNG, not reset them."""
    cfg = TrainConfig(world_size=1, epochs=2, train_subset=2048, test_subset=500, checkpoint_dir=str(tmp_path / "a"),
                      **EXACT_CONFIG)
    whole = launch(cfg, data=mnist, live=False)
    launch(cfg.replace(epochs=1, checkpoint_dir=str(tmp_path / "b")), data=mnist, live=False)
    resumed = launch(cfg.replace(checkpoint_dir=str(tmp_path / "b"), resume=True), data=mnist, live=False)
    assert resumed.record["runtime"]["cuda_graph"] and any("resumed from" in n for n in resumed.record["runtime"]["notes"])
    assert max_difference(whole.state_dict, resumed.state_dict) < EXACT
