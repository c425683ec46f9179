"""Fixtures for the data tests: the real Fashion-MNIST (Debian's dataset-fashion-mnist)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hita.data.dataset import FASHION_MNIST_DEFAULT_DIR, FASHION_MNIST_ENV


def fashion_dir() -> Path | None:
    root = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT_DIR))
    return root if (root / "t10k-images-idx3-ubyte.gz").is_file() or (root / "t10k-images-idx3-ubyte").is_file() else None


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    root = fashion_dir()
    if root is None:
        pytest.skip("Fashion-MNIST IDX files not found: `apt-get install dataset-fashion-mnist` (or set $HITA_FASHION_MNIST)")
    return root


@pytest.fixture(scope="session")
def fashion_test(fashion_root):
    from hita.data.fashion_mnist import FashionMNIST

    return FashionMNIST(fashion_root, "test", limit=64)
