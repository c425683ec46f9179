"""Lazy imports of the evaluation extras, each refused in one line that names the package to install."""
from __future__ import annotations

from types import ModuleType

EVAL_EXTRA_FIX = "install the evaluation extras: pip install 'hita[eval]'"


class MissingExtra(ValueError):
    """An optional library this metric needs is not installed; the message names it and the fix."""


def scipy_linalg() -> ModuleType:
    """``scipy.linalg`` (the FID matrix square root)."""
    try:
        import scipy.linalg
    except ImportError:
        raise MissingExtra(f"FID needs scipy (for the matrix square root), which is not installed; {EVAL_EXTRA_FIX}") \
            from None
    return scipy.linalg


def skimage_metrics() -> ModuleType:
    """``skimage.metrics`` (SSIM)."""
    try:
        import skimage.metrics
    except ImportError:
        raise MissingExtra(f"SSIM needs scikit-image, which is not installed; {EVAL_EXTRA_FIX}") from None
    return skimage.metrics
