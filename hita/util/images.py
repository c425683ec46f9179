"""Write generated images: one PNG per image, or a labelled grid. Every file is written atomically.

Inputs are uint8 ``[n, H, W, 3]`` arrays or tensors, as produced by
:func:`hita.runtimes.loop.to_uint8`. A file is first written to a temporary name in the target
folder and then moved over the final name with ``os.replace``, so a reader never sees a half-written
PNG, even when a run is interrupted.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from hita.util.files import atomic_write

__all__ = ["save_pngs", "save_grid"]

_PAD = 2          # pixels between cells and around the grid
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def _as_uint8_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 images [n, H, W, 3], got {arr.dtype} {tuple(arr.shape)}; "
            "convert decoder output with hita.runtimes.loop.to_uint8 first"
        )
    return arr


def _save_atomic(img: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_pngs(
    images: torch.Tensor | np.ndarray, out_dir: str | os.PathLike, names: Sequence[str]
) -> list[Path]:
    """Save each image as ``out_dir/<name>.png``.

    Args:
        images: uint8 ``[n, H, W, 3]``.
        out_dir: folder, created if missing.
        names: ``n`` file names, with or without the ``.png`` suffix, without folders.
    Returns:
        the ``n`` paths written.
    """
    arr = _as_uint8_nhwc(images)
    if len(names) != arr.shape[0]:
        raise ValueError(f"got {len(names)} names for {arr.shape[0]} images; pass one name per image")
    out = Path(out_dir)
    paths = []
    for name in names:
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"image name {name!r} must be a plain file name (no folders)")
        paths.append(out / (name if name.lower().endswith(".png") else f"{name}.png"))
    if len(set(paths)) != len(paths):
        raise ValueError("image names must be unique; two images would overwrite each other")
    for img, path in zip(arr, paths):
        _save_atomic(Image.fromarray(img), path)
    return paths


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Cut ``text`` so it fits in ``width`` pixels (labels are a hint, not a caption)."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def save_grid(
    images: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    nrow: int = 8,
    labels: Sequence[str] | None = None,
) -> Path:
    """Save images as one grid PNG, ``nrow`` images per row, with an optional label under each cell.

    Args:
        images: uint8 ``[n, H, W, 3]``.
        path: output file (parent folders are created).
        nrow: images per grid row (the last row may be shorter).
        labels: ``n`` strings drawn in a white strip under each cell with PIL's default font
            (cut to the cell width), or ``None`` for no strips.
    Returns:
        the path written.
    """
    arr = _as_uint8_nhwc(images)
    n, h, w, _ = arr.shape
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive integer, got {nrow!r}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images; pass one label per image or None")
    font = ImageFont.load_default()
    strip = 0
    if labels is not None:
        left, top, right, bottom = font.getbbox("Ag")
        strip = bottom + 2 * _PAD
    cols, rows = min(nrow, n), -(-n // nrow)
    cell_w, cell_h = w + _PAD, h + strip + _PAD
    canvas = Image.new("RGB", (_PAD + cols * cell_w, _PAD + rows * cell_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(arr):
        x, y = _PAD + (i % nrow) * cell_w, _PAD + (i // nrow) * cell_h
        canvas.paste(Image.fromarray(img), (x, y))
        if labels is not None:
            draw.text((x, y + h + _PAD), _fit(draw, str(labels[i]), font, w), fill=_TEXT, font=font)
    out = Path(path)
    _save_atomic(canvas, out)
    return out
