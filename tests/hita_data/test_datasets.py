"""Data sets, augmentation and step batches on real Fashion-MNIST images."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hita.data import Augmented, DataError, StepBatchSampler, open_dataset
from hita.data import transforms as T
from hita.data.fashion_mnist import FashionMNIST, read_idx
from hita.data.folder import ImageFolder


def write_png_folder(root: Path, data, n_per_class: int = 3, classes=(0, 1)) -> Path:
    """``root/<class name>/<i>.png`` from real Fashion-MNIST images (RGB, upscaled to 40×36)."""
    names = {0: "tshirt", 1: "trouser", 2: "pullover"}
    for c in classes:
        (root / names[c]).mkdir(parents=True, exist_ok=True)
        idx = [i for i in range(len(data)) if int(data.labels[i]) == c][:n_per_class]
        for j, i in enumerate(idx):
            data.load(i).convert("RGB").resize((40, 36)).save(root / names[c] / f"{j}.png")
    return root


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "a").write_bytes(raw)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    (tmp_path / "bad").write_bytes(raw[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "bad")
    (tmp_path / "junk").write_bytes(b"\x89PNG....")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk")


def test_fashion_mnist_real_files(fashion_root, fashion_test):
    assert len(fashion_test) == 64 and fashion_test.num_classes == 10
    assert fashion_test.images.shape == (64, 28, 28) and fashion_test.labels.dtype == np.int64
    assert set(fashion_test.labels.tolist()) <= set(range(10))
    train = FashionMNIST(fashion_root, "train", limit=5)
    assert train.labels.tolist() == [9, 0, 0, 3, 0]  # the first training labels of Fashion-MNIST
    # A folder holding the IDX files is recognised as Fashion-MNIST.
    assert isinstance(open_dataset(fashion_root, split="test", limit=3), FashionMNIST)


def test_augmented_resize_rgb_range_and_determinism(fashion_test):
    view = Augmented(fashion_test, 32, seed=3)
    x, y = view[(5, 0)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.0
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey repeated to RGB
    assert y == int(fashion_test.labels[5])
    assert torch.equal(view[(5, 0)][0], x)  # a key always gives the same sample
    flips = {bool(torch.equal(view[(5, e)][0], x)) for e in range(12)}
    assert flips == {True, False}  # the flip changes with the epoch
    plain = Augmented(fashion_test, 32, augment="resize")[(5, 0)][0]
    assert torch.equal(plain, x) or torch.equal(plain, x.flip(-1))


def test_random_crop_matches_reference_ranges():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8))
    rng = np.random.default_rng(1)
    for _ in range(20):
        assert T.random_crop_arr(img, 32, rng).shape == (32, 32, 3)
    assert T.center_crop_arr(img, 32).shape == (32, 32, 3)
    # The short side is resized into [size, ceil(size / 0.8)] before cropping (ADM random_crop_arr).
    assert (np.ceil(32 / 1.0), np.ceil(32 / 0.8)) == (32, 40)


def test_image_folder_classes_and_crop(tmp_path, fashion_test):
    root = write_png_folder(tmp_path / "imgs", fashion_test)
    ds = open_dataset(root)
    assert isinstance(ds, ImageFolder)
    assert ds.classes == ("trouser", "tshirt") and len(ds) == 6
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = Augmented(ds, 32, seed=0)[(4, 0)]  # default: reference random crop + flip
    assert x.shape == (3, 32, 32) and y == 1
    assert len(open_dataset(root, limit=4)) == 4


def test_image_folder_errors(tmp_path, fashion_test):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="one sub-folder per class"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        open_dataset(tmp_path / "hollow")
    root = write_png_folder(tmp_path / "stray", fashion_test)
    (root / "tshirt" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt is not an image.*remove it"):
        open_dataset(root)
    root = write_png_folder(tmp_path / "loose", fashion_test)
    (root / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="directly in the data folder"):
        open_dataset(root)
    root = write_png_folder(tmp_path / "corrupt", fashion_test)
    (root / "tshirt" / "zz.png").write_bytes(b"garbage")
    ds = open_dataset(root)
    with pytest.raises(DataError, match=r"cannot decode image .*zz\.png"):
        Augmented(ds, 32)[(len(ds) - 1, 0)]
    with pytest.raises(DataError, match="is a file"):
        open_dataset(root / "tshirt" / "0.png")


def test_step_batches_split_over_ranks_and_resume():
    single = StepBatchSampler(50, 8, seed=1)
    ranks = [StepBatchSampler(50, 8, seed=1, rank=r, world=2) for r in range(2)]
    for step in (0, 5, 6, 13):  # 6 steps per epoch: 6 and 13 lie in later epochs
        assert ranks[0].batch(step) + ranks[1].batch(step) == single.batch(step)
    assert list(StepBatchSampler(50, 8, seed=1, start_step=4, stop_step=7)) == [single.batch(s) for s in (4, 5, 6)]
    epoch0 = [k for s in range(6) for k in single.batch(s)]
    assert len({i for i, _ in epoch0}) == 48 and {e for _, e in epoch0} == {0}
    with pytest.raises(DataError, match="fewer than the global batch"):
        StepBatchSampler(4, 8)
    with pytest.raises(DataError, match="not divisible"):
        StepBatchSampler(50, 7, world=2)
