import shutil
import urllib.error

import pytest
import torch

from ddp_helpers.data import (RAW_FILES, MNISTDataError, batches, ensure_mnist, eval_indices, load_datasets,
                              load_mnist_split, raw_folder, resolve_data_root, steps_per_epoch, train_indices)
from ddp_helpers.engine import evaluate
from ddp_helpers.model import MLP


def reference_shard(n, rank, world_size, epoch, seed):
    """DistributedSampler's rule written out: one shared permutation, padded, strided by rank."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    total = -(-n // world_size) * world_size
    perm += perm[: total - n]
    return perm[rank:total:world_size]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_shards_are_disjoint_cover_the_data_and_match_the_reference(world_size):
    n = 600
    shards = [train_indices(n, r, world_size, epoch=0, seed=7) for r in range(world_size)]
    everything = torch.cat(shards)
    assert sorted(everything.tolist()) == list(range(n))  # disjoint and covering
    for r, shard in enumerate(shards):
        assert shard.tolist() == reference_shard(n, r, world_size, 0, 7)


def test_uneven_shards_are_padded_like_distributed_sampler():
    n, world_size = 10, 3
    shards = [train_indices(n, r, world_size, 0, 0) for r in range(world_size)]
    assert [len(s) for s in shards] == [4, 4, 4]
    everything = torch.cat(shards).tolist()
    assert set(everything) == set(range(n)) and len(everything) - n == 2


def test_shards_change_with_the_epoch_and_another_process_draws_the_same_ones():
    """Each rank draws the permutation itself: another process, whose global generator is in another
    state (as a rank's is after its dropout masks), must draw the very same shards."""
    import json
    import subprocess
    import sys

    a0, a1 = train_indices(1000, 0, 2, 0, 0), train_indices(1000, 0, 2, 1, 0)
    assert not torch.equal(a0, a1)
    assert set(train_indices(1000, 0, 2, 3, 0).tolist()).isdisjoint(train_indices(1000, 1, 2, 3, 0).tolist())
    code = ("import json, torch; torch.manual_seed(1234); torch.rand(99); "
            "from ddp_helpers.data import train_indices; "
            "print(json.dumps([train_indices(1000, r, 2, 3, 0).tolist() for r in (0, 1)]))")
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                      check=True).stdout)
    assert other == [train_indices(1000, r, 2, 3, 0).tolist() for r in (0, 1)]


def test_batch_arithmetic():
    assert steps_per_epoch(60000, 1, 32) == 1875
    assert steps_per_epoch(60000, 2, 32) == 938   # not 469: each worker sees 30,000 samples
    assert steps_per_epoch(60000, 4, 32) == 469


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_counts_every_test_sample_exactly_once(mnist, world_size):
    test = mnist[1].to("cpu", torch.float64)  # float64: the sums agree to 1e-9 on any CPU
    n = len(test)
    shards = [eval_indices(n, r, world_size) for r in range(world_size)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    torch.manual_seed(0)
    model = MLP().double()
    full = evaluate(model, test, eval_indices(n, 0, 1))["sums"]
    parts = torch.stack([evaluate(model, test, s)["sums"] for s in shards])  # what each rank would all-reduce
    assert parts[:, 2].sum() == full[2] == n == 10_000
    assert parts[:, 1].sum() == full[1]
    assert float(parts[:, 0].sum()) == pytest.approx(float(full[0]), rel=1e-9)


def test_real_mnist_is_preloaded_and_normalised(mnist):
    train, test = mnist
    assert train.images.shape == (60000, 784) and test.images.shape == (10000, 784)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert abs(train.images.mean().item()) < 0.01 and abs(train.images.std().item() - 1) < 0.01
    assert torch.bincount(train.labels).tolist()[:2] == [5923, 6742]  # MNIST's known class counts
    x, y = next(batches(train, torch.arange(32), 32))
    assert x.shape == (32, 784) and torch.equal(y, train.labels[:32])


def test_data_root_flag_then_environment_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_root("") == tmp_path / "env"
    monkeypatch.delenv("MNIST_DATA_DIR")
    assert resolve_data_root("").name == "data"


def test_missing_data_with_download_off_names_folder_and_fix(tmp_path):
    with pytest.raises(MNISTDataError) as info:
        ensure_mnist(tmp_path, download=False)
    message = str(info.value)
    assert str(raw_folder(tmp_path)) in message and "Fix:" in message and "MNIST_DATA_DIR" in message


def test_missing_data_offline_names_folder_and_fix(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz",
                           urllib.error.URLError("Name or service not known"))

    monkeypatch.setattr(MNIST, "download", offline)
    with pytest.raises(MNISTDataError) as info:
        ensure_mnist(tmp_path, download=True)
    assert str(raw_folder(tmp_path)) in str(info.value) and "download failed" in str(info.value)
    assert "connect to the internet" in str(info.value)


def test_missing_data_never_falls_back_to_synthetic(tmp_path):
    with pytest.raises(MNISTDataError):
        load_datasets("mnist", str(tmp_path))
    train, _ = load_datasets("synthetic", train_subset=64, test_subset=16)  # only when asked by name
    assert len(train) == 64


def _copy_of_mnist(mnist_root, tmp_path):
    folder = raw_folder(tmp_path)
    folder.mkdir(parents=True)
    for name in RAW_FILES:
        (folder / name).symlink_to(raw_folder(mnist_root) / name)
    return folder


def test_truncated_raw_file_names_the_file(mnist_root, tmp_path):
    folder = _copy_of_mnist(mnist_root, tmp_path)
    labels = folder / "train-labels-idx1-ubyte"
    data = labels.read_bytes()
    labels.unlink()
    labels.write_bytes(data[:30000])
    for load in (lambda: ensure_mnist(tmp_path, download=False), lambda: load_mnist_split(tmp_path, True)):
        with pytest.raises(MNISTDataError) as info:
            load()
        assert str(labels) in str(info.value) and "truncated" in str(info.value)
    assert labels.stat().st_size == 30000  # the damaged file is reported, not replaced


def test_corrupt_raw_file_fails_its_checksum(mnist_root, tmp_path):
    folder = _copy_of_mnist(mnist_root, tmp_path)
    labels = folder / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    labels.unlink()
    data[5000] ^= 0xFF
    labels.write_bytes(bytes(data))
    with pytest.raises(MNISTDataError, match="md5.*corrupt"):
        ensure_mnist(tmp_path, download=False)
    shutil.rmtree(tmp_path / "MNIST")
