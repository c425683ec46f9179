"""Token plans for editing: which tokens come from where.

Style transfer keeps the content image's patch tokens and takes the style image's holistic tokens
(all of them, or chosen slots). In-painting regenerates the patch tokens that carry the masked cells.
Because of the decoder's ``shift_k`` (spec 1.5), cell j is read at sequence position
``n_holistic - shift_k + j``: for j >= shift_k that is the position of patch token j - shift_k, whose
output attends to patch tokens 0 .. j - shift_k. So a masked cell j is regenerated through patch token
j - shift_k (the last token its feature sees) and through patch token j itself (the token the encoder
wrote at that cell); the first ``shift_k`` cells come from holistic positions only.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["mix_holistic", "patch_regen_mask"]


def mix_holistic(content: torch.Tensor, style: torch.Tensor, slots: Sequence[int] | None = None) -> torch.Tensor:
    """Holistic ids (B, Nh) of ``content`` with ``slots`` (default: all) replaced by ``style``'s."""
    if content.shape != style.shape:
        raise ValueError(f"holistic ids of content {tuple(content.shape)} and style {tuple(style.shape)} differ")
    n = content.shape[1]
    if slots is None:
        return style.clone()
    bad = [s for s in slots if not 0 <= s < n]
    if bad:
        raise ValueError(f"holistic slots {bad} out of range [0, {n}); pick slots 0..{n - 1}")
    out = content.clone()
    idx = torch.as_tensor(list(slots), dtype=torch.long)
    out[:, idx] = style[:, idx]
    return out


def patch_regen_mask(cells: torch.Tensor, shift_k: int) -> torch.Tensor:
    """bool (grid*grid,) patch tokens to regenerate for masked token-grid ``cells`` (grid, grid)."""
    flat = cells.reshape(-1).bool()
    out = flat.clone()
    j = torch.nonzero(flat).flatten()
    j = j[j >= shift_k] - shift_k
    out[j] = True
    return out
