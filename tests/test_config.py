import json

import pytest

from ddp_helpers.config import TrainConfig


def test_defaults_are_the_seed_design():
    cfg = TrainConfig()
    assert cfg.hidden_sizes == [512, 256, 128]
    assert (cfg.dropout, cfg.batch_size, cfg.epochs, cfg.lr, cfg.weight_decay) == (0.2, 32, 5, 1e-3, 1e-5)
    assert (cfg.lr_step, cfg.lr_gamma, cfg.world_size, cfg.seed) == (3, 0.5, 2, 0)


def test_round_trips_through_dict_and_json():
    cfg = TrainConfig(world_size=3, hidden_sizes=[64, 32], sync="allreduce")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_json(json.dumps(cfg.to_dict())) == cfg


@pytest.mark.parametrize("field, value, words", [
    ("world_size", 0, ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("batch_size", 2.5, "integer"),
    ("epochs", 0, ">= 1"),
    ("lr", 0.0, "> 0"),
    ("lr", -1e-3, "> 0"),
    ("weight_decay", -1.0, ">= 0"),
    ("dropout", 1.0, "[0, 1)"),
    ("lr_gamma", 0.0, "(0, 1]"),
    ("lr_step", 0, ">= 1"),
    ("hidden_sizes", [], "non-empty"),
    ("hidden_sizes", [512, 0], "positive"),
    ("backend", "mpi", "one of"),
    ("device", "tpu", "one of"),
    ("sync", "magic", "one of"),
    ("dataset", "fake", "one of"),
    ("master_port", 70000, "65535"),
    ("timeout_s", 0, "> 0"),
    ("threads_per_rank", -1, ">= 0"),
    ("train_subset", -5, ">= 0"),
    ("fail_rank", 5, "rank in"),
])
def test_bad_values_raise_value_error_naming_field_and_range(field, value, words):
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value})
    assert f"TrainConfig.{field}=" in str(info.value)
    assert words in str(info.value)


def test_nccl_without_enough_gpus_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="nccl.*CUDA device"):
        TrainConfig(backend="nccl", world_size=2)


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"batchsize": 64})
