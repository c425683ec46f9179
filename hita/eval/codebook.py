"""Codebook health: how many codes a data set uses, how evenly (perplexity), and per position.

A collapsed codebook looks fine in a loss curve and terrible here: the embedded tokenizer's holistic
codebook once used one code per slot over the whole test set, so its 16 holistic tokens carried no
information about the image. Counting per position (holistic slot / patch cell) is what exposes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CodebookUsage", "UsageCounter"]


@dataclass(frozen=True)
class CodebookUsage:
    """Usage of one codebook over ``images`` images.

    Fields:
        used: distinct codes seen at any position; ``fraction_used`` = used / size.
        perplexity: exp(entropy) of the pooled code histogram: the number of equally likely codes
            with the same entropy (``size`` at best, 1 when one code is always chosen).
        per_position_used: distinct codes at each position (holistic slot or patch cell).
    """

    name: str
    size: int
    images: int
    used: int
    perplexity: float
    per_position_used: tuple[int, ...]

    @property
    def fraction_used(self) -> float:
        return self.used / self.size

    @property
    def positions_with_one_code(self) -> int:
        """Positions that always get the same code: they carry no information about the image."""
        return sum(1 for u in self.per_position_used if u <= 1)

    def to_dict(self) -> dict:
        per = np.asarray(self.per_position_used)
        return {"name": self.name, "size": self.size, "images": self.images, "used": self.used,
                "fraction_used": round(self.fraction_used, 6), "perplexity": round(self.perplexity, 3),
                "per_position_used": {"min": int(per.min()), "median": float(np.median(per)), "max": int(per.max())},
                "positions": len(per), "positions_with_one_code": self.positions_with_one_code}


class UsageCounter:
    """Accumulates a (positions × size) histogram of token ids, batch by batch."""

    def __init__(self, name: str, size: int, positions: int):
        self.name, self.size, self.positions = name, size, positions
        self.counts = np.zeros(positions * size, dtype=np.int64)
        self.images = 0

    def add(self, ids: np.ndarray) -> None:
        """ids: int (B, positions) token ids in [0, size)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] != self.positions:
            raise ValueError(f"{self.name}: expected ids (B, {self.positions}), got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"{self.name}: ids outside [0, {self.size})")
        flat = ids + self.size * np.arange(self.positions)[None, :]
        self.counts += np.bincount(flat.ravel(), minlength=self.counts.size)
        self.images += ids.shape[0]

    def result(self) -> CodebookUsage:
        per_pos = self.counts.reshape(self.positions, self.size)
        pooled = per_pos.sum(0)
        total = pooled.sum()
        if total == 0:
            raise ValueError(f"{self.name}: no tokens counted; evaluate at least one image")
        p = pooled[pooled > 0] / total
        return CodebookUsage(self.name, self.size, self.images, int((pooled > 0).sum()),
                             float(math.exp(-(p * np.log(p)).sum())),
                             tuple(int(u) for u in (per_pos > 0).sum(1)))
