"""Loss terms of the Hita recipes (spec 6.1, 6.2): reconstruction, adversarial (hinge / softplus), CE.

Each is a plain function of tensors; the trainers own the weights and the start steps. Losses are
computed in float32 whatever the autocast dtype of their inputs.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

ReconLoss = Literal["mse", "l1"]
RECON_LOSSES: tuple[str, ...] = ("mse", "l1")


def reconstruction_loss(x: Tensor, x_hat: Tensor, kind: ReconLoss = "mse") -> Tensor:
    """``rec(x, x̂) + MSE(x, x̂)``: 2×MSE with ``kind="mse"`` (the reference default), else L1 + MSE."""
    x, x_hat = x.float(), x_hat.float()
    mse = F.mse_loss(x_hat, x)
    if kind == "mse":
        return 2.0 * mse
    if kind == "l1":
        return F.l1_loss(x_hat, x) + mse
    raise ValueError(f"unknown reconstruction loss {kind!r}; valid: {', '.join(RECON_LOSSES)}")


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss ``0.5 · (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))``."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def softplus_g_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``mean softplus(−D(x̂))`` (the reference's ``--gen-loss``)."""
    return F.softplus(-logits_fake.float()).mean()


def gpt_loss(hol_logits: Tensor, patch_logits: Tensor, holistic_ids: Tensor, patch_ids: Tensor) -> tuple[Tensor, Tensor]:
    """CE over holistic tokens and CE over patch tokens, each a token mean (their sum is the loss)."""
    ce_h = F.cross_entropy(hol_logits.float().flatten(0, 1), holistic_ids.flatten())
    ce_p = F.cross_entropy(patch_logits.float().flatten(0, 1), patch_ids.flatten())
    return ce_h, ce_p
