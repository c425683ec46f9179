"""Cosine vector quantiser used twice by the Hita tokenizer (patch codebook and holistic codebook).

Both the input vectors and the codebook rows are l2-normalised, so the nearest entry is the
max-cosine entry and the quantised value is a *unit-norm* codebook row (spec 1.4). Stored codebook
rows are not guaranteed to be unit-norm (training updates them freely), which is why every lookup
re-normalises them: a decoder that skipped this would produce wrong features from released weights.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Length of the rolling usage log; fixed by the released checkpoints' `codebook_used` buffers.
USAGE_LOG_LEN = 65536


class QuantizerOutput(NamedTuple):
    """``zq``: straight-through quantised vectors (same shape as the input, unit-norm rows);
    ``indices``: int64 codebook indices (input shape without the channel axis);
    ``vq_loss`` / ``commit_loss``: scalar training terms (commit already multiplied by beta)."""

    zq: Tensor
    indices: Tensor
    vq_loss: Tensor
    commit_loss: Tensor


class VectorQuantizer(nn.Module):
    """l2-normalised ("cosine") VQ over ``n_codes`` entries of width ``code_dim``.

    Keys: ``embedding.weight`` [n_codes, code_dim] and the ``codebook_used`` [65536] float32 buffer
    (a training-time usage log; saved because the reference loaders expect it)."""

    def __init__(self, n_codes: int, code_dim: int, beta: float):
        super().__init__()
        self.n_codes = n_codes
        self.code_dim = code_dim
        self.beta = beta
        self.embedding = nn.Embedding(n_codes, code_dim)
        with torch.no_grad():
            # Uniform(-1/n, 1/n) then unit rows: the reference's starting point for cosine VQ.
            nn.init.uniform_(self.embedding.weight, -1.0 / n_codes, 1.0 / n_codes)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        self.register_buffer("codebook_used", torch.zeros(USAGE_LOG_LEN, dtype=torch.float32))

    def codebook(self) -> Tensor:
        """Unit-norm codebook rows, (n_codes, code_dim)."""
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def lookup(self, indices: Tensor) -> Tensor:
        """Indices (...) int64 -> unit-norm code vectors (..., code_dim)."""
        return F.embedding(indices, self.codebook())

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise channel-last vectors ``z`` (..., code_dim)."""
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"expected vectors of width {self.code_dim}, got shape {tuple(z.shape)}")
        z = F.normalize(z, p=2, dim=-1)
        flat = z.reshape(-1, self.code_dim)  # (N, code_dim)
        codebook = self.codebook()  # (n_codes, code_dim)
        # Squared distance |z|^2 + |e|^2 - 2 z.e, the reference's expression (kept so near-ties resolve
        # the same way); on unit vectors its argmin is the max-cosine entry.
        dist = (
            flat.pow(2).sum(dim=1, keepdim=True)
            + codebook.pow(2).sum(dim=1)
            - 2.0 * flat @ codebook.t()
        )  # (N, n_codes)
        indices = dist.argmin(dim=1)  # (N,)
        zq = F.embedding(indices, codebook).view_as(z)  # (..., code_dim)
        vq_loss = torch.mean((zq - z.detach()) ** 2)
        commit_loss = self.beta * torch.mean((zq.detach() - z) ** 2)
        if self.training:
            self._log_usage(indices)
        zq = z + (zq - z).detach()  # straight-through gradient
        return QuantizerOutput(zq, indices.view(z.shape[:-1]), vq_loss, commit_loss)

    @torch.no_grad()
    def _log_usage(self, indices: Tensor) -> None:
        """Shift the newest indices into the end of the rolling ``codebook_used`` log (training only,
        like a BatchNorm running statistic; used for codebook-usage monitoring, never for decoding)."""
        new = indices[-USAGE_LOG_LEN:].to(self.codebook_used.dtype)
        n = new.numel()
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], new]))
