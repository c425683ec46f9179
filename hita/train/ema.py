"""Exponential moving average of a model's trainable parameters, kept as a state dict.

The reference (decay 0.9999, every step) starts from a copy of the model and averages parameters only;
buffers such as the VQ ``codebook_used`` logs are copied verbatim. The average lives in a plain
``{key: tensor}`` dict shaped like ``model.state_dict()`` (frozen parts such as an attached DINOv2 are
never in it), ready to be saved in the project's checkpoint format.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """``ema = decay · ema + (1 − decay) · param`` after every optimizer step.

    ``warmup=True`` uses ``min(decay, (1 + n) / (10 + n))`` at update ``n`` instead, so that short runs
    get a usable average (the reference uses the plain decay).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1) (got {decay})")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        sd = model.state_dict()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in sd.items()}
        self.param_keys = [k for k in sd if k in trainable]
        self.copy_keys = [k for k in sd if k not in trainable]

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        params = dict(model.named_parameters())
        ema_p = [self.shadow[k] for k in self.param_keys]
        torch._foreach_mul_(ema_p, d)
        torch._foreach_add_(ema_p, [params[k].detach() for k in self.param_keys], alpha=1.0 - d)
        if self.copy_keys:
            sd = model.state_dict()
            for k in self.copy_keys:
                self.shadow[k].copy_(sd[k])
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, keyed like ``model.state_dict()``."""
        return self.shadow

    def load_state_dict(self, sd: dict[str, Tensor], updates: int) -> None:
        missing = sorted(set(self.shadow) - set(sd))
        if missing:
            raise ValueError(f"EMA weights lack {len(missing)} keys (first: {missing[0]}); the checkpoint is damaged")
        for k, v in self.shadow.items():
            v.copy_(sd[k])
        self.updates = updates
