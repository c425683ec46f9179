"""Image metrics shared by export validation, runtime parity and reports."""
from __future__ import annotations

import math

__all__ = ["psnr"]


def psnr(a, b, peak_to_peak: float = 2.0) -> float:
    """PSNR in dB of two images (torch tensors) on a range of ``peak_to_peak`` (2 for [-1, 1]);
    ``inf`` when identical. Computed in float64 on the CPU."""
    mse = float(((a.detach().double().cpu() - b.detach().double().cpu()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak_to_peak**2 / mse)
