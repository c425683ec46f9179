"""Reading the user's PNGs for editing: one-line refusals that say the cause and the fix.

Policy: 8-bit grey or RGB images are accepted (grey is repeated to RGB, as the training data was);
opaque RGBA / LA / palette images are converted; anything with transparency or more than 8 bits is
refused. A square image of another size is *resized* (bicubic, as the data set was brought to the
model's size) and the caller is told so; a non-square image is *refused* (resizing would distort it).
Masks must have the image's own size (checked before any resize), white (> 127) = the region to fill.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["EditError", "LoadedImage", "load_image", "load_mask", "cell_mask"]

MAX_SIDE = 4096


class EditError(ValueError):
    """An editing input cannot be used; the message is one line: the cause and the fix."""


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """``pixels``: uint8 (size, size, 3) at the model's size; ``native``: (width, height) as read;
    ``note``: what was done to it (e.g. a resize), '' when nothing."""

    pixels: np.ndarray
    native: tuple[int, int]
    note: str


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise EditError(f"{what} {path}: no such file; pass an existing PNG")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise EditError(f"{what} {path}: cannot be read as an image ({type(e).__name__}); pass a PNG") from None
    w, h = img.size
    if max(w, h) > MAX_SIDE or min(w, h) < 1:
        raise EditError(f"{what} {path}: is {w}x{h}; images up to {MAX_SIDE} pixels a side are accepted: shrink it")
    return img


def _opaque(img: Image.Image, what: str, path) -> Image.Image:
    alpha = np.asarray(img.getchannel("A"))
    if alpha.min() < 255:
        raise EditError(f"{what} {path}: has transparent pixels (mode {img.mode}); flatten it onto a background "
                        "and save it as an RGB or greyscale PNG")
    return img.convert("RGB")


def _to_rgb(img: Image.Image, what: str, path) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.repeat(np.asarray(img)[:, :, None], 3, axis=2)
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("RGBA", "LA"):
        return np.asarray(_opaque(img, what, path))
    if mode == "P":
        return np.asarray(_opaque(img.convert("RGBA"), what, path))
    raise EditError(f"{what} {path}: has mode {mode} (not 8-bit grey or RGB); save it as an 8-bit RGB or greyscale PNG")


def load_image(path: str | os.PathLike, size: int, what: str = "image") -> LoadedImage:
    """Read ``path`` as uint8 RGB at ``size`` x ``size`` (see the module policy)."""
    img = _open(path, what)
    w, h = img.size
    if w != h:
        raise EditError(f"{what} {path}: is {w}x{h}, not square; the model takes {size}x{size} images: "
                        "crop it to a square first")
    rgb = _to_rgb(img, what, path)
    note = ""
    if w != size:
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
        note = f"{what} {Path(path).name} resized {w}x{h} -> {size}x{size} (bicubic)"
    return LoadedImage(np.ascontiguousarray(rgb), (w, h), note)


def load_mask(path: str | os.PathLike, native: tuple[int, int], size: int) -> np.ndarray:
    """The mask as float coverage (size, size) in [0, 1]; white (> 127) marks pixels to fill.

    Raises:
        EditError: unreadable, of another size than the image (``native``), or empty.
    """
    img = _open(path, "mask")
    if img.size != native:
        raise EditError(f"mask {path}: is {img.size[0]}x{img.size[1]} but the image is {native[0]}x{native[1]}; "
                        "draw the mask at the image's size")
    if img.mode in ("I", "I;16", "F"):
        raise EditError(f"mask {path}: has mode {img.mode}; save it as an 8-bit greyscale PNG (white = fill)")
    on = np.asarray(img.convert("L")) > 127  # (h, w)
    if not on.any():
        raise EditError(f"mask {path}: is empty (no pixel above 127), so there is nothing to in-paint; paint the "
                        "region to fill white on black")
    cover = Image.fromarray(on.astype(np.uint8) * 255).resize((size, size), Image.BOX)
    return np.asarray(cover, dtype=np.float32) / 255.0


def cell_mask(coverage: np.ndarray, grid: int) -> np.ndarray:
    """Token-grid cells (grid, grid) that any masked pixel touches (coverage at any size)."""
    h = coverage.shape[0]
    if coverage.shape != (h, h) or h % grid:
        raise ValueError(f"mask coverage {coverage.shape} does not tile a {grid}x{grid} grid")
    c = h // grid
    return coverage.reshape(grid, c, grid, c).max(axis=(1, 3)) > 0
