"""PNG and grid writers: round trip, layout, labels, validation, no temp files left behind."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hita.util.images import save_grid, save_pngs


def _images(n=3, h=8, w=10):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def test_save_pngs_round_trip(tmp_path):
    imgs = _images()
    paths = save_pngs(imgs, tmp_path / "out", ["a", "b.png", "c"])
    assert [p.name for p in paths] == ["a.png", "b.png", "c.png"]
    for img, p in zip(imgs, paths):
        assert np.array_equal(np.asarray(Image.open(p)), img.numpy())
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]
    save_pngs(imgs.numpy(), tmp_path / "out", ["a", "b", "c"])  # numpy input, overwrite in place


@pytest.mark.parametrize(
    "names,match", [(["a", "b"], "3 images"), (["a", "a", "b"], "unique"), (["a", "x/b", "c"], "plain")]
)
def test_save_pngs_rejects_bad_names(tmp_path, names, match):
    with pytest.raises(ValueError, match=match):
        save_pngs(_images(), tmp_path, names)


def test_save_pngs_rejects_float_images(tmp_path):
    with pytest.raises(ValueError, match="to_uint8"):
        save_pngs(torch.zeros(1, 3, 8, 8), tmp_path, ["a"])


def test_save_grid_layout_without_labels(tmp_path):
    imgs = _images(n=5)
    path = save_grid(imgs, tmp_path / "sub" / "grid.png", nrow=2)
    grid = np.asarray(Image.open(path))
    # 2 columns x 3 rows of 10x8 cells with 2-pixel padding.
    assert grid.shape == (2 + 3 * (8 + 2), 2 + 2 * (10 + 2), 3)
    assert np.array_equal(grid[2:10, 2:12], imgs[0].numpy())
    assert np.array_equal(grid[12:20, 14:24], imgs[3].numpy())
    assert [x.name for x in (tmp_path / "sub").iterdir()] == ["grid.png"]


def test_save_grid_with_labels_adds_text_strips(tmp_path):
    imgs = torch.full((2, 16, 40, 3), 255, dtype=torch.uint8)
    plain = np.asarray(Image.open(save_grid(imgs, tmp_path / "a.png", nrow=2)))
    labels = ["cat", "a very long label"]
    labelled = np.asarray(Image.open(save_grid(imgs, tmp_path / "b.png", nrow=2, labels=labels)))
    assert labelled.shape[1] == plain.shape[1] and labelled.shape[0] > plain.shape[0]
    strip = labelled[2 + 16:, 2:42]
    assert (strip < 128).any()  # some dark text pixels under the first cell
    with pytest.raises(ValueError, match="one label per image"):
        save_grid(imgs, tmp_path / "c.png", labels=["x"])
    with pytest.raises(ValueError, match="nrow"):
        save_grid(imgs, tmp_path / "c.png", nrow=0)
