"""Score a tokenizer on a data set: codebook usage of both codebooks, PSNR / SSIM, holistic influence.

``holistic_swap``: each image is decoded again with the holistic tokens of the next image in the batch
(patch tokens kept). The mean absolute change in uint8 pixels says how much the holistic tokens steer
the picture; it is exactly 0 when the holistic codebook has collapsed (every image gets the same
holistic tokens), which is how the embedded tokenizer's collapse shows up in one number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hita.data import transforms as T
from hita.eval.codebook import CodebookUsage, UsageCounter
from hita.eval.recon import psnr_per_image, ssim_per_image, to_uint8_images

__all__ = ["TokenizerReport", "evaluate_tokenizer", "dataset_batches"]


@dataclass(frozen=True)
class TokenizerReport:
    images: int
    holistic: CodebookUsage
    patch: CodebookUsage
    psnr: float
    ssim: float
    holistic_swap_change: float  # mean |Δ uint8 pixel| when holistic tokens come from another image

    def to_dict(self) -> dict:
        return {"images": self.images, "holistic": self.holistic.to_dict(), "patch": self.patch.to_dict(),
                "psnr_db": round(self.psnr, 3), "ssim": round(self.ssim, 4),
                "holistic_swap_change": round(self.holistic_swap_change, 3)}

    def markdown(self, title: str = "tokenizer") -> str:
        rows = ["| codebook | size | codes used | fraction used | perplexity | per-position codes (min / median / max) "
                "| positions with one code |", "|---|---|---|---|---|---|---|"]
        for u in (self.holistic, self.patch):
            per = np.asarray(u.per_position_used)
            rows.append(f"| {u.name} | {u.size} | {u.used} | {100 * u.fraction_used:.1f} % | {u.perplexity:.1f} | "
                        f"{per.min()} / {np.median(per):g} / {per.max()} | {u.positions_with_one_code} of {len(per)} |")
        return (f"### {title} ({self.images} images)\n\n" + "\n".join(rows) +
                f"\n\nreconstruction PSNR {self.psnr:.2f} dB, SSIM {self.ssim:.4f}; holistic-swap change "
                f"{self.holistic_swap_change:.2f} uint8 levels\n")


def dataset_batches(ds, size: int, batch_size: int, limit: int | None = None):
    """Yield uint8 (B, size, size, 3) batches of a hita data set, resized (bicubic) without augmentation."""
    n = len(ds) if limit is None else min(limit, len(ds))
    for a in range(0, n, batch_size):
        arrs = [T.resize_arr(ds.load(i), size) for i in range(a, min(a + batch_size, n))]
        yield np.stack([np.repeat(x[:, :, None], 3, 2) if x.ndim == 2 else x[:, :, :3] for x in arrs])


@torch.no_grad()
def evaluate_tokenizer(tok, batches, progress: Callable[[int], None] | None = None) -> TokenizerReport:
    """Encode and decode every batch of uint8 (B, S, S, 3) images (S = the tokenizer's image size).

    Args:
        tok: a :class:`~hita.models.tokenizer.HitaTokenizer` (eval mode; encoding needs its backbone).
        batches: iterable of uint8 arrays.
        progress: called with the number of images done so far.
    """
    cfg = tok.cfg
    hol = UsageCounter("holistic", cfg.codebook_size, cfg.n_holistic)
    pat = UsageCounter("patch", cfg.codebook_size, cfg.n_patch)
    psnr, ssim, swap = [], [], []
    dev = next(tok.parameters()).device
    done = 0
    for real in batches:
        x = torch.from_numpy(np.ascontiguousarray(real)).permute(0, 3, 1, 2).float().to(dev) / 127.5 - 1.0
        h_ids, p_ids = tok.encode(x)
        hol.add(h_ids.cpu().numpy())
        pat.add(p_ids.cpu().numpy())
        recon = to_uint8_images(tok.decode(h_ids, p_ids))
        psnr.append(psnr_per_image(real, recon))
        ssim.append(ssim_per_image(real, recon))
        if len(real) > 1:
            swapped = to_uint8_images(tok.decode(h_ids.roll(1, dims=0), p_ids))
            swap.append(np.abs(swapped.astype(np.int16) - recon.astype(np.int16)).reshape(len(real), -1).mean(1))
        done += len(real)
        if progress is not None:
            progress(done)
    if done == 0:
        raise ValueError("no images to evaluate; check the data set and --limit")
    p = np.concatenate(psnr)
    return TokenizerReport(done, hol.result(), pat.result(), float(np.mean(np.minimum(p, 100.0))),
                           float(np.concatenate(ssim).mean()),
                           float(np.concatenate(swap).mean()) if swap else float("nan"))
