"""Shared test setup: real MNIST from ../shared/data when it exists, loaded once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "MNIST_DATA_DIR" not in os.environ and (SHARED_DATA / "MNIST" / "raw").is_dir():
    os.environ["MNIST_DATA_DIR"] = str(SHARED_DATA)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The real MNIST root (downloaded if missing and online; a clear error otherwise)."""
    from ddp_helpers.data import ensure_mnist

    return ensure_mnist()


@pytest.fixture(scope="session")
def mnist(mnist_root):
    """(train, test) real MNIST splits as tensors, decoded once per session."""
    from ddp_helpers.data import load_mnist_split

    return load_mnist_split(mnist_root, True), load_mnist_split(mnist_root, False)
