"""Redraw the README's editing pictures from a model pair (default: the embedded one).

Why a script: the pictures are evidence of what the holistic tokens carry, so they must be redrawn
whenever the embedded model changes, from the same test images and options; this keeps them
reproducible instead of hand-made. Everything goes through the library calls behind
`hita style-transfer` / `hita inpaint` (torch runtime, CPU).

    .venv/bin/python docs/make_pictures.py [--gpt G --tokenizer T] [--out docs]

Writes into ``--out``:
- ``holistic-swap.png``: test images (top row: holistic source; left column: patch source); cell
  (i, j) decodes image i's patch tokens with image j's holistic tokens, so the diagonal is the plain
  reconstruction and each row shows what changes when only the holistic tokens change;
- ``edit-style-transfer.png``: the `hita style-transfer` grids of two content / style pairs, stacked;
- ``edit-inpaint.png``: the `hita inpaint` grids (lower half masked, conditioned on the image's class,
  guidance 3, ``--holistic sample``, 4 fills, seed 0) of two images, stacked. ``sample`` because the
  holistic tokens now carry global appearance: ``encode`` takes them from the image with its hole
  filled grey, and the fills then inherit that grey, dim look; drawn by the GPT they fit the class.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Swap grid: the first test image of each class, in label order. Style transfer and in-painting:
# Fashion-MNIST test indices (content, style) and images; the pairs are explained in hita/assets/README.md.
SWAP_CLASSES = tuple(range(10))
STYLE_PAIRS = ((0, 2), (1, 8))
INPAINT_IMAGES = (0, 1)
INPAINT_HOLISTIC = "sample"  # see the module docstring


def _test_images(n: int = 2000):
    from hita.data import open_dataset

    return open_dataset("fashion-mnist", split="test", limit=n)


def _native(data, i: int) -> np.ndarray:
    """Test image ``i`` as uint8 (28, 28, 3), the way a user's PNG would arrive."""
    img = np.asarray(data.load(i).convert("L"))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img.astype(np.uint8)


def _first_of_class(data, k: int, skip: int = 0) -> int:
    idx = [i for i, y in enumerate(data.labels) if int(y) == k]
    return idx[skip]


def holistic_swap(models, data, out: Path, pad: int = 4) -> Path:
    from hita.edit.images import load_image
    from hita.jobs.edit import _decode, _visible, encode_images
    from hita.util.images import save_grid

    size = models.tokenizer.cfg.image_size
    picks = [_first_of_class(data, k) for k in SWAP_CLASSES]
    with tempfile.TemporaryDirectory() as tmp:
        pixels = []
        for i in picks:
            p = Path(tmp) / f"{i}.png"
            Image.fromarray(_native(data, i)).save(p)
            pixels.append(load_image(p, size, "image").pixels)
    hol, patch = encode_images(models.tokenizer, pixels)
    n = len(picks)
    rows = []
    for i in range(n):  # patch tokens of image i with every image's holistic tokens
        rows.append(_decode(models.executor, hol, patch[i:i + 1].expand(n, -1)))
    blank = np.full_like(pixels[0], 255)
    cells = [blank, *pixels]
    for i in range(n):
        cells += [pixels[i], *rows[i]]
    names = models.class_names or tuple(str(k) for k in range(10))
    labels = ["patch \\ hol."] + [names[k] for k in SWAP_CLASSES]
    for i in range(n):
        labels += [names[SWAP_CLASSES[i]]] + [""] * n
    return save_grid(_visible(np.stack(cells)), out / "holistic-swap.png", nrow=n + 1, labels=labels)


def _stack(paths: list[Path], out: Path) -> Path:
    imgs = [Image.open(p).convert("RGB") for p in paths]
    w = max(i.width for i in imgs)
    canvas = Image.new("RGB", (w, sum(i.height for i in imgs)), "white")
    y = 0
    for i in imgs:
        canvas.paste(i, (0, y))
        y += i.height
    canvas.save(out)
    return out


def edits(models, data, out: Path) -> list[Path]:
    from hita.jobs.edit import inpaint_job, style_transfer_job
    from hita.runtimes.sampling import SamplingOptions

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def png(i: int) -> Path:
            p = tmp / f"fm{i}.png"
            Image.fromarray(_native(data, i)).save(p)
            return p

        grids = []
        for n, (c, s) in enumerate(STYLE_PAIRS):
            style_transfer_job(models, png(c), png(s), tmp / f"st{n}")
            grids.append(tmp / f"st{n}" / "grid.png")
        written.append(_stack(grids, out / "edit-style-transfer.png"))

        mask = np.zeros((28, 28), np.uint8)
        mask[14:] = 255
        Image.fromarray(mask).save(tmp / "mask.png")
        grids = []
        opts = SamplingOptions(cfg_scale=3.0, seed=0)
        for n, i in enumerate(INPAINT_IMAGES):
            inpaint_job(models, png(i), tmp / "mask.png", tmp / f"ip{n}", int(data.labels[i]), opts, samples=4,
                        holistic=INPAINT_HOLISTIC)
            grids.append(tmp / f"ip{n}" / "grid.png")
        written.append(_stack(grids, out / "edit-inpaint.png"))
    return written


def main() -> None:
    from hita.jobs.edit import load_edit_models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt")
    ap.add_argument("--tokenizer")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args()
    torch.manual_seed(0)
    models = load_edit_models("torch", gpt=args.gpt, tokenizer=args.tokenizer)
    data = _test_images()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in [holistic_swap(models, data, out), *edits(models, data, out)]:
        print("wrote", p)


if __name__ == "__main__":
    main()
