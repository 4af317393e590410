"""Notebook 08's lessons on spawned gloo ranks: the ring here; memory, ZeRO-1 and the five mistakes
are asserted by the notebook's checked cells (tagged nbval-check-output), which the suite runs."""

from __future__ import annotations

from ddp_helpers.exhibits import inside


def test_the_ring_sums_exactly_like_all_reduce_and_sends_2_w_minus_1_over_w():
    world_size, length = 3, 9
    ranks = inside.collectives(world_size, length)
    expected = [sum(100 * r + i for r in range(world_size)) for i in range(length)]
    for rank, out in ranks.items():
        assert out["ring"] == expected and out["ring_equals_all_reduce"]
        assert out["all_gather"] == ranks[0]["all_gather"] == [ranks[i // (length // world_size)]["mine"][i]
                                                                 for i in range(length)]
        chunk = length // world_size
        assert out["reduce_scatter"] == expected[rank * chunk:(rank + 1) * chunk]
        assert out["reduce_scatter_all_gather_equals_all_reduce"]
        assert out["bytes_sent"] == 2 * (world_size - 1) * (length // world_size) * 8  # float64
