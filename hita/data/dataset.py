"""What every training data set offers, the per-sample augmentation view, and ``open_dataset``.

A data set here is a list of (image, label) pairs: ``__len__``, ``labels`` (int64 array),
``num_classes``, ``load(i) -> PIL RGB image``. The view ``Augmented`` turns one into tensors for
training: its items are keyed by ``(index, epoch)`` and the random crop / flip of that item is drawn
from a generator seeded with (seed, epoch, index), so results never depend on worker or rank layout.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image

from hita.data import transforms as T

Augment = Literal["crop-flip", "resize-flip", "center", "resize"]
AUGMENTS: tuple[str, ...] = ("crop-flip", "resize-flip", "center", "resize")
FASHION_MNIST_NAME = "fashion-mnist"
# Where Debian's `dataset-fashion-mnist` package installs the IDX files; overridable by env var.
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "HITA_FASHION_MNIST"


class DataError(ValueError):
    """Training data cannot be used. The message's first line says what is wrong and how to fix it."""


class ImageDataset(Protocol):
    labels: np.ndarray
    num_classes: int
    default_augment: Augment

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...

    def describe(self) -> str: ...


class Augmented(torch.utils.data.Dataset):
    """Training view: ``view[(index, epoch)] -> (image [3,S,S] float32 in [-1,1], label int64)``."""

    def __init__(self, data: ImageDataset, image_size: int, augment: Augment | None = None, seed: int = 0):
        augment = augment or data.default_augment
        if augment not in AUGMENTS:
            raise DataError(f"unknown augmentation {augment!r}; valid: {', '.join(AUGMENTS)}")
        self.data, self.image_size, self.augment, self.seed = data, image_size, augment, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        rng = np.random.default_rng((self.seed, epoch, index))
        img, size = self.data.load(index), self.image_size
        if self.augment == "crop-flip":
            arr = T.maybe_flip(T.random_crop_arr(img, size, rng), rng)
        elif self.augment == "resize-flip":
            arr = T.maybe_flip(T.resize_arr(img, size), rng)
        elif self.augment == "center":
            arr = T.center_crop_arr(img, size)
        else:
            arr = T.resize_arr(img, size)
        return T.to_tensor(arr), int(self.data.labels[index])


def open_dataset(spec: str | os.PathLike, split: str = "train", limit: int | None = None) -> ImageDataset:
    """Open training images from ``spec``.

    ``spec`` is ``"fashion-mnist"`` (the IDX files of Debian's ``dataset-fashion-mnist``, or the folder
    named by ``$HITA_FASHION_MNIST``), a folder holding Fashion-MNIST IDX files, or an image folder with
    one sub-folder per class. ``limit`` keeps the first ``limit`` images (Fashion-MNIST) or the first
    ``limit`` files in sorted order (folders), for short runs.
    """
    from hita.data.fashion_mnist import FashionMNIST, find_idx_files
    from hita.data.folder import ImageFolder

    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1 (got {limit})")
    if str(spec) == FASHION_MNIST_NAME:
        root = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT_DIR))
        if not root.is_dir():
            raise DataError(
                f"Fashion-MNIST not found at {root}: install it with `apt-get install dataset-fashion-mnist` "
                f"or point ${FASHION_MNIST_ENV} at a folder with its IDX files"
            )
        return FashionMNIST(root, split, limit)
    root = Path(spec)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass an existing folder or 'fashion-mnist'")
    if not root.is_dir():
        raise DataError(f"data path {root} is a file; pass a folder with one sub-folder of images per class")
    if find_idx_files(root, split) is not None:
        return FashionMNIST(root, split, limit)
    return ImageFolder(root, limit)
