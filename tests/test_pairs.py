"""The headline's pairs: rounds rotate the order, runs repeat the rounds, the statistic pools them."""

from __future__ import annotations

import statistics

import pytest
import torch

from ddp_helpers.config import TrainConfig
from ddp_helpers.errors import ConfigError
from ddp_helpers.exhibits.pairs import interleaved
from ddp_helpers.launcher import launch


def test_runs_of_rotated_rounds_pool_every_per_round_ratio():
    base = TrainConfig(world_size=1, dataset="synthetic", train_subset=256, test_subset=64, epochs=1)
    record = interleaved({"one": base, "other": base.replace(threads_per_rank=1)}, rounds=2, reference="one", runs=2,
                         fresh_process=False)  # the protocol, not the timing: in this process (quicker)
    rows = record["rows"]
    assert [(r["run"], r["round"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [r["order"][0] for r in rows] == ["one", "other", "one", "other"]  # each goes first as often
    ratios = [r["times"]["other"]["epoch_s"] / r["times"]["one"]["epoch_s"] for r in rows]
    summary = record["summary"]["other"]
    assert summary["rounds"] == ratios and summary["median"] == statistics.median(ratios)
    assert summary["run_medians"] == [statistics.median(ratios[:2]), statistics.median(ratios[2:])]
    assert record["method"]["runs"] == 2 and "declared before" in record["method"]["statistic"]


def test_one_process_in_a_fresh_worker_trains_the_same_model_as_in_this_process():
    # the pairs time one process in a spawned worker, like DDP's ranks; it must be the same run.
    # One thread and the same CPU: the same arithmetic in both processes, so the weights are equal bit for bit
    cfg = TrainConfig(world_size=1, dataset="synthetic", train_subset=256, test_subset=64, epochs=1,
                      threads_per_rank=1, device="cpu")
    here, fresh = launch(cfg, live=False), launch(cfg, live=False, fresh_process=True)
    assert here.record["runtime"]["backend"] == "none" and fresh.record["runtime"]["backend"] == "gloo"
    assert here.state_dict.keys() == fresh.state_dict.keys()
    assert all(torch.equal(here.state_dict[k], fresh.state_dict[k]) for k in here.state_dict)
    with pytest.raises(ConfigError, match="data="):
        launch(cfg, live=False, fresh_process=True, data=(None, None))
