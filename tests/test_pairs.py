"""The headline's pairs: rounds rotate the order, runs repeat the rounds, the statistic pools them."""

from __future__ import annotations

import statistics

from ddp_helpers.config import TrainConfig
from ddp_helpers.exhibits.pairs import interleaved


def test_runs_of_rotated_rounds_pool_every_per_round_ratio():
    base = TrainConfig(world_size=1, dataset="synthetic", train_subset=256, test_subset=64, epochs=1)
    record = interleaved({"one": base, "other": base.replace(threads_per_rank=1)}, rounds=2, reference="one", runs=2)
    rows = record["rows"]
    assert [(r["run"], r["round"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [r["order"][0] for r in rows] == ["one", "other", "one", "other"]  # each goes first as often
    ratios = [r["times"]["other"]["epoch_s"] / r["times"]["one"]["epoch_s"] for r in rows]
    summary = record["summary"]["other"]
    assert summary["rounds"] == ratios and summary["median"] == statistics.median(ratios)
    assert summary["run_medians"] == [statistics.median(ratios[:2]), statistics.median(ratios[2:])]
    assert record["method"]["runs"] == 2 and "declared before" in record["method"]["statistic"]
