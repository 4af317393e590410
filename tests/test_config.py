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
])
def test_bad_values_raise_value_error_naming_field_and_range(field, value, words):
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value})
    assert f"TrainConfig.{field}=" in str(info.value)
    assert words in str(info.value)


def test_nccl_without_enough_gpus_is_refused(monkeypatch):
    import torch

    from ddp_helpers.rank import prepare

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="nccl.*CUDA device"):
        prepare(TrainConfig(backend="nccl", world_size=2), local_ranks=2)  # when a run starts, on this machine


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"batchsize": 64})


def test_an_older_record_with_the_retired_fault_fields_still_replays(tmp_path):
    """Fault injection left TrainConfig for a test hook; records made before still load."""
    old = {**TrainConfig(lr=2e-3).to_dict(), "fail_rank": -1, "fail_step": 0, "fail_kind": "raise"}
    (tmp_path / "old.json").write_text(json.dumps({"kind": "train", "config": old}))
    assert TrainConfig.from_file(tmp_path / "old.json") == TrainConfig(lr=2e-3)


@pytest.mark.parametrize("text, words", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list")])
def test_a_config_file_that_is_not_a_config_is_named_in_its_one_line_error(tmp_path, text, words):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with pytest.raises(ValueError) as info:
        TrainConfig.from_file(bad)
    assert str(bad) in str(info.value) and words in str(info.value) and "\n" not in str(info.value)


# --- the rules that compare this node's resources with its ranks (torchrun's environment mocked) ---

TWO_NODES_OF_EIGHT = {"TORCHELASTIC_RUN_ID": "job", "RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16",
                      "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.fixture
def eight_gpus(monkeypatch):
    import torch
    import torch.distributed as dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)


@pytest.fixture
def second_node_of_two(monkeypatch):
    for key, value in TWO_NODES_OF_EIGHT.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_torchrun_environment_is_read_once_into_plain_values(second_node_of_two):
    from ddp_helpers.place import launcher_place

    env = launcher_place()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (11, 16, 3, 8)
    assert (env.master_addr, env.master_port, env.attempt) == ("10.0.0.1", 29500, 0)


def test_a_restarted_torchrun_attempt_resumes_only_where_the_run_keeps_checkpoints(second_node_of_two, monkeypatch,
                                                                                  tmp_path):
    from ddp_helpers.place import launcher_place
    from ddp_helpers.rank import attempt_config

    first = attempt_config(TrainConfig(dataset="synthetic"), launcher_place())
    assert first.world_size == 16 and not first.resume
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    over = attempt_config(TrainConfig(dataset="synthetic"), launcher_place())
    assert not over.resume  # no checkpoints: start over (was: "resume needs checkpoint_dir")
    over.validate()
    kept = attempt_config(TrainConfig(dataset="synthetic", checkpoint_dir=str(tmp_path)), launcher_place())
    assert kept.resume  # the training, the journal and the folder check all see resume
    kept.validate()


def test_two_eight_gpu_nodes_may_use_nccl(second_node_of_two, eight_gpus):
    from ddp_helpers.dist import check_devices, pick_backend, pick_device
    from ddp_helpers.place import launcher_place

    check_devices("nccl", "auto", launcher_place().local_world_size)  # 8 local ranks, 8 GPUs: accepted
    assert launcher_place().local_world_size == 8
    assert pick_backend("auto", launcher_place().local_world_size) == "nccl"  # not a silent fallback to gloo
    assert str(pick_device("auto", "nccl", 3)) == "cuda:3"


def test_nccl_is_refused_when_this_node_has_fewer_gpus_than_ranks(second_node_of_two, monkeypatch, eight_gpus):
    import torch

    from ddp_helpers.dist import check_devices, pick_backend
    from ddp_helpers.place import launcher_place

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match="8 local rank.*4 CUDA device"):
        check_devices("nccl", "auto", launcher_place().local_world_size)
    assert pick_backend("auto", 8) == "gloo"


def test_auto_backend_is_gloo_when_the_device_is_the_cpu(eight_gpus):
    from ddp_helpers.dist import pick_backend

    assert pick_backend("auto", 2, "auto") == "nccl" and pick_backend("auto", 2, "cpu") == "gloo"


def test_threads_come_from_the_ranks_on_this_node_unless_set(second_node_of_two, monkeypatch):
    from ddp_helpers import dist
    from ddp_helpers.place import launcher_place

    monkeypatch.setattr(dist, "usable_cores", lambda: 64)
    assert dist.threads_for(0, launcher_place().local_world_size) == (8, "64 usable cores // 8 rank(s) on this node")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert dist.threads_for(0, 8) == (2, "OMP_NUM_THREADS=2")
    assert dist.threads_for(3, 8) == (3, "threads_per_rank=3 (config)")  # the config wins


@pytest.mark.parametrize("launcher, omp, expected", [
    ("spawn", None, (8, "16 usable cores // 2 rank(s) on this node")),
    ("slurm", None, (8, "16 usable cores // 2 rank(s) on this node")),
    ("torchrun", "1", (1, "OMP_NUM_THREADS=1, which torchrun sets when it is unset: this node has 16 usable cores "
                          "for 2 ranks; --threads-per-rank 8 (or OMP_NUM_THREADS=8) uses them")),
    ("torchrun", "4", (4, "OMP_NUM_THREADS=4")),
])
def test_the_thread_rule_with_the_variables_each_launcher_sets(launcher, omp, expected, monkeypatch):
    """torchrun gives each of a node's several workers OMP_NUM_THREADS=1 when it is unset; spawn and
    srun leave it unset. The 1 is honoured, and on a node with spare cores the rule says how to use them."""
    from ddp_helpers import dist

    monkeypatch.setattr(dist, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert dist.threads_for(0, 2, launcher) == expected


def test_each_rank_joins_with_the_gpu_of_its_local_rank(second_node_of_two, eight_gpus, monkeypatch):
    """Global rank 11 is local rank 3 on the second node: it must take cuda:3 (cuda:11 does not
    exist there, and NCCL told the wrong device hangs)."""
    import contextlib
    import importlib
    import types

    import torch

    from ddp_helpers.place import launcher_place

    rank = importlib.import_module("ddp_helpers.rank")

    seen = {}

    @contextlib.contextmanager
    def joined(rank, world_size, store, **options):
        seen.update(rank=rank, world_size=world_size, **options)
        yield types.SimpleNamespace(gather=lambda value: [value], device=options["device"])

    monkeypatch.setattr(rank, "process_group", joined)
    monkeypatch.setattr(rank, "open_transport", lambda *args, **kwargs: types.SimpleNamespace(close=lambda: None))
    with rank.rank_context(TrainConfig(), launcher_place(), store=object()):
        pass
    assert (seen["rank"], seen["world_size"], seen["backend"]) == (11, 16, "nccl")
    assert seen["device"] == torch.device("cuda", 3)
