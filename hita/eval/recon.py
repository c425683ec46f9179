"""Reconstruction quality of uint8 images: PSNR and SSIM per image, averaged.

Both are computed on uint8 pixels (data range 255), after the reference's conversion of decoder
output (``clamp(127.5 x + 128)`` and truncation), so they score what a user would save as PNG. SSIM is
scikit-image's ``structural_similarity`` (uniform 7×7 window, colour channels averaged) with the
correct data range; the reference passes 2.0 for [0, 1] data (spec 7), so its numbers differ.
"""
from __future__ import annotations

import numpy as np
import torch

from hita.eval.optional import skimage_metrics

__all__ = ["to_uint8_images", "psnr_per_image", "ssim_per_image"]


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Decoder output float (B, 3, H, W), nominally [-1, 1] -> uint8 (B, H, W, 3), as the reference saves it."""
    return torch.clamp(127.5 * x.detach().float().cpu() + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


def psnr_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB of each uint8 pair (B, H, W, C); identical images give +inf."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs images of one shape, got {a.shape} and {b.shape}")
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / mse)


def ssim_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of each uint8 pair (B, H, W, C), data range 255, channels averaged."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of one shape, got {a.shape} and {b.shape}")
    ssim = skimage_metrics().structural_similarity
    return np.array([ssim(x, y, data_range=255, channel_axis=-1) for x, y in zip(a, b)])
