"""Image transforms for training: the reference random crop + flip, resizing, and PIL → tensor.

Every random choice takes an explicit ``numpy.random.Generator``; the loaders seed one per sample from
(seed, epoch, index), so an augmented batch depends on nothing else: not on the worker that built it,
the rank that reads it, or whether the run was resumed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def _halve_then_resize(img: Image.Image, short: int) -> Image.Image:
    # ADM's anti-aliasing trick: BOX-halve while the short side is at least twice the target, then one
    # BICUBIC resize so that the short side equals ``short``.
    while min(*img.size) >= 2 * short:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = short / min(*img.size)
    return img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)


def random_crop_arr(img: Image.Image, size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
    """ADM ``random_crop_arr``: short side resized to a uniform size in [size/max, size/min], random crop.

    With the defaults the short side lands in [size, 1.25·size] (336 → [336, 420]). Returns uint8 HWC.
    """
    min_short = math.ceil(size / max_crop_frac)
    max_short = math.ceil(size / min_crop_frac)
    short = int(rng.integers(min_short, max_short + 1))
    arr = np.asarray(_halve_then_resize(img, short))
    top = int(rng.integers(0, arr.shape[0] - size + 1))
    left = int(rng.integers(0, arr.shape[1] - size + 1))
    return arr[top:top + size, left:left + size]


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM ``center_crop_arr``: short side resized to ``size`` (BOX halving, BICUBIC), centre crop."""
    arr = np.asarray(_halve_then_resize(img, size))
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def resize_arr(img: Image.Image, size: int) -> np.ndarray:
    """Resize to ``size``×``size`` (BICUBIC), ignoring the aspect ratio: for small square data sets."""
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.BICUBIC)
    return np.asarray(img)


def maybe_flip(arr: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Horizontal flip with probability ``p`` (HWC or HW arrays)."""
    return arr[:, ::-1] if rng.random() < p else arr


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB (or HW grey, repeated to RGB) → float32 [3, H, W] in [-1, 1]."""
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()  # (3, H, W)
    return t / 127.5 - 1.0
