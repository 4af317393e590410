"""Notebook 08's lessons on spawned gloo ranks: each asserts what the protocol guarantees."""

from __future__ import annotations

from ddp_helpers.exhibits import inside
from ddp_helpers.model import MLP


def test_the_ring_sums_exactly_like_all_reduce_and_sends_2_w_minus_1_over_w():
    world_size, length = 3, 9
    ranks = inside.collectives(world_size, length)
    expected = [sum(100 * r + i for r in range(world_size)) for i in range(length)]
    for rank, out in ranks.items():
        assert out["ring"] == expected and out["ring_equals_all_reduce"]
        assert out["all_gather"] == ranks[0]["all_gather"] == [ranks[i // (length // world_size)]["mine"][i]
                                                                 for i in range(length)]
        assert out["bytes_sent"] == 2 * (world_size - 1) * (length // world_size) * 8  # float64


def test_zero_1_keeps_whole_tensors_so_fc1_makes_one_rank_hold_most_of_the_state():
    full = inside.adam_state_bytes(MLP())
    for world_size in (2,):  # notebook 08 shows W=4 too
        ranks = inside.zero_state(world_size)
        assert sum(out["state_bytes"] for out in ranks.values()) == full
        owned = [name for out in ranks.values() for name in out["owned"]]
        assert sorted(owned) == sorted(name for name, _ in MLP().named_parameters())  # each once
        biggest = max(ranks.values(), key=lambda out: out["state_bytes"])
        assert "net.0.weight" in biggest["owned"] and biggest["state_bytes"] > 0.69 * full
        assert len({out["digest"] for out in ranks.values()}) == 1  # every rank holds the same model


def test_four_mistakes_fail_as_torch_says_and_their_fixes_work():
    ranks = inside.mistakes(uneven_timeout_s=2)
    for rank, out in ranks.items():
        saving = out["saving"]
        assert saving["ddp_keys"][0].startswith("module.") and not saving["module_keys"][0].startswith("module.")
        assert saving["load_ddp_state_dict"].startswith("RuntimeError") and "Missing key" in saving["load_ddp_state_dict"]
        unused = out["unused parameters"]
        assert unused["find_unused_parameters=False"].startswith("step 2: RuntimeError")
        assert unused["find_unused_parameters=True"] == "2 steps done"
        accumulation = out["accumulation"]
        right, wrong, every = (accumulation[k] for k in accumulation)
        assert (right["gradients sent"], wrong["gradients sent"], every["gradients sent"]) == (1, 0, 2)
        assert right["ranks_differ_by"] == 0 == every["ranks_differ_by"] and wrong["ranks_differ_by"] > 0
        assert right["differs_from_every_step_by"] < 1e-12  # float64: the same sum in another order
    uneven = [ranks[r]["uneven inputs"] for r in (0, 1)]
    assert uneven[0]["batches"] == 3 and uneven[1]["batches"] == 5
    assert uneven[0]["with Join"].split("digest")[1] == uneven[1]["with Join"].split("digest")[1]
    assert uneven[0]["without Join"] == "3 steps done" and uneven[1]["without Join"].startswith("step 4 waited")


def test_memory_per_rank_counts_the_tensors_and_samples_pss(mnist_root):
    out = inside.memory_per_rank(str(mnist_root), steps=5)
    for rank in out["ranks"].values():
        counts = rank["bytes"]
        assert counts["parameters"] == 4 * sum(p.numel() for p in MLP().parameters())
        assert counts["Adam's two moments"] == 2 * counts["parameters"]
        assert counts["activations kept for backward"] > 0 and rank["samples"] > 0
        assert rank["peak_pss_mib"] >= max(pss for pss, _ in rank["stages"].values()) * 0.999
    assert out["launcher_peak_pss_mib"] > 0

