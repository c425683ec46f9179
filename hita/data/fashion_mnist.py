"""Fashion-MNIST from its IDX files (gzip or raw): 28×28 grey images, 10 classes, held in memory.

The images are served as PIL images; ``Augmented`` resizes them to the preset's resolution and
repeats the grey channel to RGB.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from hita.data.dataset import DataError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_PREFIX = {"train": "train", "test": "t10k"}
# IDX type codes → numpy dtypes (big-endian on disk).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, limit: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array of its declared shape and type.

    ``limit`` reads only the first ``limit`` records (a prefix of the stream: fast for short runs).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise DataError(f"{path} is not an IDX file (bad magic number); pass the Fashion-MNIST IDX files")
            ndim = head[3]
            dims = [int.from_bytes(f.read(4), "big") for _ in range(ndim)]
            if limit is not None and dims:
                dims[0] = min(dims[0], limit)
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            count = int(np.prod(dims))
            raw = f.read(count * dtype.itemsize)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path} ({e}); the file may be truncated: reinstall it") from None
    if len(raw) != count * dtype.itemsize:
        raise DataError(f"{path}: shorter than its header {dims} says; the file is truncated: reinstall it")
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx_files(root: Path, split: str) -> tuple[Path, Path] | None:
    """(images, labels) IDX paths of ``split`` under ``root``, gzip or raw; None when absent."""
    if split not in _PREFIX:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; valid: {', '.join(_PREFIX)}")
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        stem = f"{_PREFIX[split]}-{kind}"
        path = next((root / n for n in (stem + ".gz", stem) if (root / n).is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


class FashionMNIST:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) read from the IDX files under ``root``."""

    num_classes = len(CLASSES)
    classes = CLASSES
    default_augment = "resize-flip"

    def __init__(self, root: str | Path, split: str = "train", limit: int | None = None):
        self.root = Path(root)
        paths = find_idx_files(self.root, split)
        if paths is None:
            raise DataError(
                f"no Fashion-MNIST {split} IDX files in {self.root} (expected {_PREFIX[split]}-images-idx3-ubyte"
                "[.gz] and the labels file); install `dataset-fashion-mnist` or pass the right folder"
            )
        images, labels = read_idx(paths[0], limit), read_idx(paths[1], limit)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{paths[0]} / {paths[1]}: shapes {images.shape} / {labels.shape} do not form a "
                            "data set of grey images and labels; pass the Fashion-MNIST IDX files")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)  # (N, 28, 28)
        self.labels = labels.astype(np.int64)
        self.split = split

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])  # uint8 (28, 28) → mode "L"

    def describe(self) -> str:
        return f"Fashion-MNIST {self.split} ({len(self)} images, {self.num_classes} classes) from {self.root}"
