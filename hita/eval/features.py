"""Pluggable feature extractors: one call turns uint8 images into features (and class logits).

Every metric in :mod:`hita.eval.metrics` reads the output of an extractor, so FID / IS / precision /
recall are computed once, in whatever space is chosen: the shipped Fashion-MNIST classifier (the
meaningful space for the embedded model) or Inception-v3 (the space of published ImageNet numbers,
:mod:`hita.eval.inception`). An extractor declares a ``name`` (recorded in reports and shard files,
so shards of different spaces never mix), its ``feature_dim`` and whether its logits are the
generator's classes (``class_logits``: per-class accuracy of generated images is then meaningful).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

__all__ = ["Features", "FeatureExtractor", "ClassifierFeatures", "extract"]


@dataclass(frozen=True, eq=False)
class Features:
    """features float32 (B, D); logits float32 (B, K) or None."""

    features: np.ndarray
    logits: np.ndarray | None


class FeatureExtractor(Protocol):
    name: str
    feature_dim: int
    class_logits: bool

    def __call__(self, images: np.ndarray) -> Features:
        """uint8 (B, H, W, 3) -> Features."""


class ClassifierFeatures:
    """The Fashion-MNIST classifier's penultimate activations and its 10 class logits."""

    class_logits = True

    def __init__(self, model, batch_size: int = 500, name: str = "fmnist-classifier"):
        self.model = model.eval()
        self.batch_size = batch_size
        self.name = name
        self.feature_dim = model.cfg.feature_dim

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> Features:
        from hita.eval.classifier import to_classifier_input

        feats, logits = [], []
        for i in range(0, len(images), self.batch_size):
            x = to_classifier_input(torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])),
                                    self.model.cfg.image_size)
            f, z = self.model.features_and_logits(x)
            feats.append(f.numpy())
            logits.append(z.numpy())
        return Features(np.concatenate(feats).astype(np.float32), np.concatenate(logits).astype(np.float32))


def extract(extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 1000) -> Features:
    """Run ``extractor`` over many images in batches (keeps memory flat for large reference sets)."""
    parts = [extractor(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    logits = None if parts[0].logits is None else np.concatenate([p.logits for p in parts])
    return Features(np.concatenate([p.features for p in parts]), logits)
