"""MNIST as preloaded tensors, and how each rank picks its share of them.

Each split is one normalised float tensor and a batch is an ``index_select`` into it: the seed
design's per-sample PIL transform and DataLoader cost seconds per epoch on this problem.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DistributedSampler

from .errors import ConfigError, DDPError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGE_PIXELS = 28 * 28
NUM_CLASSES = 10

# Uncompressed IDX files: (magic number, shape, md5 of the published file).
RAW_FILES = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28), "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (2049, (60000,), "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28), "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (2049, (10000,), "27ae3e4e09519cfbb04c329615203637"),
}
TRAIN_SAMPLES = RAW_FILES["train-labels-idx1-ubyte"][1][0]
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class MNISTDataError(DDPError, RuntimeError):
    """The MNIST files are missing, cannot be downloaded, or are damaged."""


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The MNIST root: the explicit argument, then $MNIST_DATA_DIR, then data/ in the project."""
    data_dir = data_dir or os.environ.get("MNIST_DATA_DIR")
    return Path(data_dir).expanduser().resolve() if data_dir else PROJECT_ROOT / "data"


def raw_folder(root: Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def _check_raw_file(path: Path, magic: int, shape: tuple[int, ...], md5: str | None) -> None:
    fix = (f"Delete {path} and run again with download enabled (online), or copy the genuine "
           f"file there from a good MNIST copy.")
    expected = 4 * (1 + len(shape)) + int(torch.tensor(shape).prod())
    size = path.stat().st_size
    if size != expected:
        raise MNISTDataError(f"MNIST file {path} is {size:,} bytes but should be {expected:,} "
                             f"(truncated or not an MNIST file). {fix}")
    with open(path, "rb") as fh:
        header = fh.read(4 * (1 + len(shape)))
    words = [int.from_bytes(header[i:i + 4], "big") for i in range(0, len(header), 4)]
    if words[0] != magic or tuple(words[1:]) != shape:
        raise MNISTDataError(f"MNIST file {path} has header {words}, expected magic {magic} and shape "
                             f"{list(shape)}. {fix}")
    if md5 is not None:
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if digest != md5:
            raise MNISTDataError(f"MNIST file {path} has md5 {digest}, expected {md5}: the file is "
                                 f"corrupt. {fix}")


def check_mnist_files(root: Path, verify_checksums: bool = True) -> None:
    """Raise :class:`MNISTDataError` naming the first missing or damaged raw file."""
    folder = raw_folder(root)
    for name, (magic, shape, md5) in RAW_FILES.items():
        path = folder / name
        if not path.is_file():
            raise MNISTDataError(f"MNIST file {path} is missing.")
        _check_raw_file(path, magic, shape, md5 if verify_checksums else None)


def ensure_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Make sure genuine MNIST is under the data root and return the root: missing files are downloaded
    through torchvision if allowed, damaged ones never replaced silently; errors name the folder or
    file and the fix."""
    root = resolve_data_root(data_dir)
    folder = raw_folder(root)
    missing = [n for n in RAW_FILES if not (folder / n).is_file()]
    if missing:
        how = ("Fix: connect to the internet and run again (torchvision downloads it), or copy the four raw "
               f"IDX files ({', '.join(RAW_FILES)}) into {folder}, or point --data-dir / MNIST_DATA_DIR at a "
               "folder that holds MNIST/raw/.")
        if not download:
            raise MNISTDataError(f"MNIST not found: {folder} lacks {', '.join(missing)} and download is off. {how}")
        try:
            from torchvision.datasets import MNIST

            for train in (True, False):
                MNIST(str(root), train=train, download=True)
        except Exception as exc:  # torchvision raises RuntimeError/URLError/OSError when offline
            raise MNISTDataError(f"MNIST not found in {folder} and the download failed "
                                 f"({type(exc).__name__}: {exc}). {how}") from exc
    check_mnist_files(root, verify_checksums=True)
    return root


@dataclass
class Split:
    """One split of a dataset as tensors: images (N, 784) normalised float32, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "Split":
        """On ``device``, images in ``dtype`` (float64 makes equivalence tests exact on any CPU)."""
        return Split(self.images.to(device, dtype), self.labels.to(device))

    def head(self, n: int) -> "Split":
        """The first n samples (all of them when n is 0 or too large)."""
        return self if n <= 0 or n >= len(self) else Split(self.images[:n], self.labels[:n])


def _normalise(raw: torch.Tensor) -> torch.Tensor:
    return raw.reshape(raw.shape[0], IMAGE_PIXELS).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)


def load_mnist_split(root: Path, train: bool) -> Split:
    """Decode one split through torchvision into tensors (files must already be present)."""
    from torchvision.datasets import MNIST

    for name, (magic, shape, _) in RAW_FILES.items():
        if name.startswith("train" if train else "t10k"):
            path = raw_folder(root) / name
            if not path.is_file():
                raise MNISTDataError(f"MNIST file {path} is missing. Run ensure_mnist() or the CLI once online.")
            _check_raw_file(path, magic, shape, md5=None)
    ds = MNIST(str(root), train=train, download=False)
    return Split(_normalise(ds.data), ds.targets.long())


def synthetic_split(n: int, seed: int) -> Split:
    """Random MNIST-shaped data with a learnable rule. Only used when asked for by name."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = (raw.reshape(n, -1)[:, :98].float().mean(1) * NUM_CLASSES / 256).long().clamp_(0, 9)
    return Split(_normalise(raw), labels)


def load_datasets(dataset: str, data_dir: str = "", train_subset: int = 0, test_subset: int = 0,
                  seed: int = 0) -> tuple[Split, Split]:
    """(train, test) splits as tensors, cut to the requested subsets."""
    if dataset == "synthetic":
        train, test = synthetic_split(train_subset or 6000, seed), synthetic_split(test_subset or 1000, seed + 1)
    elif dataset == "mnist":
        root = resolve_data_root(data_dir)
        train, test = load_mnist_split(root, True), load_mnist_split(root, False)
    else:
        raise ConfigError(f"unknown dataset {dataset!r}; expected 'mnist' or 'synthetic'")
    return train.head(train_subset), test.head(test_subset)


# --- who trains and evaluates on what -------------------------------------------------

def train_indices(n: int, rank: int, world_size: int, epoch: int, seed: int) -> torch.Tensor:
    """This rank's shuffled share of range(n) for an epoch, exactly as DistributedSampler gives it:
    every rank draws the same permutation (seed + epoch), pads it to a multiple of the world size
    by repeating its start, and takes every world_size-th index from its rank."""
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def eval_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of the test set: strided and unpadded, so each sample counts once."""
    return torch.arange(rank, n, world_size, dtype=torch.long)


def batches(split: Split, indices: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of the given indices in order; the last one may be short."""
    indices = indices.to(split.images.device)  # once, not per batch: a per-batch copy to a GPU stalls it
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        yield split.images.index_select(0, idx), split.labels.index_select(0, idx)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def steps_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """Steps each worker takes per epoch: ceil(ceil(n / W) / B)."""
    return ceil_div(ceil_div(n, world_size), batch_size)
